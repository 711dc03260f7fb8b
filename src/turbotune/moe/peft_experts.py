"""peft's parameter LoRA on expert stacks (``target_parameters``), read by the patched experts
without peft's per-forward parametrization.

Design note. peft 0.21 adapts a stacked expert parameter with a ``ParamWrapper`` (one per stack,
nested: the outermost one replaces the experts module in its parent). Every forward it registers
a ``torch.nn.utils.parametrize`` parametrization on the stack (``W + s * lhs @ rhs`` through a
factors proxy), runs the experts module, and removes the parametrization again: measured ~1.5 ms
of host time per layer per forward on the CPU test model, and impossible on a quantized stack,
which is not a parameter. :func:`reroute_expert_lora` records the wrappers on their experts
module (``_turbotune_lora``: stack name -> wrapper) and lets the outermost wrapper call the
experts module directly; the patched experts forward reads the active adapter's factors with
:func:`peft_factors` (peft's own ``get_delta_factors``) and runs them as grouped rank-r products.
Nothing about the adapter changes: its parameters, saving and loading are peft's. When the
experts forward is not turbotune's (the ``moe`` patch undone), the wrapper runs peft's own
forward again, so the adapter is never silently dropped.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

LORA_KEY = "_turbotune_lora"
"""``experts.__dict__`` key of the rerouted wrappers (stack name -> peft ``ParamWrapper``)."""


def lora_wrappers(model: nn.Module) -> dict[int, list[nn.Module]]:
    """peft ``ParamWrapper`` layers by the id of the module whose parameter they adapt."""
    found: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        if hasattr(m, "parameter_name") and hasattr(m, "get_delta_factors"):
            found.setdefault(id(m.get_base_layer()), []).append(m)
    return found


def reroute(experts: nn.Module, wrappers: list[nn.Module]) -> None:
    """Record ``wrappers`` on ``experts`` by stack name; the outermost one calls it directly."""
    experts.__dict__[LORA_KEY] = {w.parameter_name: w for w in wrappers}
    inner = {id(w.base_layer) for w in wrappers}
    for w in wrappers:
        if id(w) not in inner:  # the wrapper the parent module calls
            w.forward = types.MethodType(_call_experts, w)


def reroute_expert_lora(model: nn.Module, experts_classes: tuple[str, ...] | None = None) -> int:
    """Reroute every peft ``target_parameters`` adapter on the experts modules of ``model``.

    Args:
        model: a peft model whose experts carry the ``moe`` patch (or will).
        experts_classes: class names of the experts modules; default: the family's ``experts``
            row of the patch table.

    Returns:
        the number of experts modules rerouted.
    """
    if experts_classes is None:
        from turbotune.patches.engine import family_of

        experts_classes = family_of(model)[1].experts
    wrappers = lora_wrappers(model)
    done = 0
    for module in model.modules():
        if type(module).__name__ in experts_classes and id(module) in wrappers:
            reroute(module, wrappers[id(module)])
            done += 1
    return done


def _call_experts(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    experts = self.get_base_layer()
    if "_turbotune_original_forward" not in experts.__dict__:  # not patched: peft's own path
        return type(self).forward(self, x, *args, **kwargs)
    return experts(x, *args, **kwargs)


def peft_factors(experts: nn.Module, name: str) -> tuple[Any, Any, float] | None:
    """``(lhs [E, N, r], rhs [E, r, K], scale)`` of the active peft adapter rerouted onto the
    stack ``name`` of ``experts`` (None: no adapter there, or adapters disabled)."""
    wrapper = experts.__dict__.get(LORA_KEY, {}).get(name)
    if wrapper is None or wrapper.disable_adapters:
        return None
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    if len(active) > 1 or wrapper.merged:
        raise NotImplementedError("several active or merged peft adapters on rerouted experts")
    return wrapper.get_delta_factors(active[0])
