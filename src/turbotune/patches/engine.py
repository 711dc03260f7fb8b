"""The one patch engine: swap forwards on a model's modules, record everything, undo it all.

Design note. Liger-Kernel ships a monkey-patch function per model family plus a ``revert_*``
helper for each; here a patch is *data*. A model family is one :class:`~turbotune.patches.families.Family`
row naming its classes; the engine walks a model, matches modules by class name, and binds the
replacement forwards from :mod:`turbotune.patches.forwards` on those *instances* (other models
in the process are untouched). The one thing that cannot be patched per instance — the
module-level ``apply_rotary_pos_emb`` that attention calls — is swapped in its module with a
reference count, so two patched models and one undo leave the other model patched.

Nothing happens at import time; :func:`apply_patches` returns a :class:`PatchSet` whose
``undo()`` restores every attribute it changed, in reverse order.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from turbotune.errors import UnsupportedModelError
from turbotune.patches import packing
from turbotune.patches.families import FAMILIES, Family

KINDS = ("rms_norm", "rope", "swiglu", "cross_entropy", "lora", "moe", "add_norm")
"""The kernel families a patch set can switch on (``add_norm``, the residual adds fused into the
decoder layers' norms, needs ``rms_norm``)."""

_MISSING = object()
_GLOBAL_REFS: dict[tuple[str, str], tuple[Any, int]] = {}  # (module, name) -> (original, count)


@dataclass
class PatchSet:
    """What one :func:`apply_patches` call changed, and how to undo it."""

    family: str
    counts: dict[str, int] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def bind(
        self, module: torch.nn.Module, kind: str | tuple[str, ...], forward: Callable[..., Any]
    ) -> None:
        """Replace ``module.forward`` (on the instance) by ``forward`` bound to it; ``kind``
        names what it brings (several names for a forward that fuses several things)."""
        previous = module.__dict__.get("forward", _MISSING)
        original = module.forward
        module._turbotune_original_forward = original
        module.forward = types.MethodType(forward, module)

        def undo() -> None:
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous
            module.__dict__.pop("_turbotune_original_forward", None)

        self._undo.append(undo)
        for name in (kind,) if isinstance(kind, str) else kind:
            self.counts[name] = self.counts.get(name, 0) + 1

    def swap_global(
        self, module_path: str, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        """Install ``make(original)`` as a module-level function (reference-counted: the first
        patch installs it, the last undo restores the original)."""
        module = importlib.import_module(module_path)
        key = (module_path, name)
        if key in _GLOBAL_REFS:
            original, count = _GLOBAL_REFS[key]
            _GLOBAL_REFS[key] = (original, count + 1)
        else:
            original = getattr(module, name)
            _GLOBAL_REFS[key] = (original, 1)
            setattr(module, name, make(original))

        def undo() -> None:
            orig, count = _GLOBAL_REFS[key]
            if count == 1:
                setattr(module, name, orig)
                del _GLOBAL_REFS[key]
            else:
                _GLOBAL_REFS[key] = (orig, count - 1)

        self._undo.append(undo)

    def undo(self) -> None:
        """Restore everything this set changed (idempotent)."""
        while self._undo:
            self._undo.pop()()
        self.counts.clear()


def family_of(model: torch.nn.Module) -> tuple[str, Family]:
    """The patch-table row of ``model`` (a transformers model, possibly wrapped by peft)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"no fused-kernel patches for model type '{model_type}'; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add a row to turbotune/patches/families.py "
            "or disable the plugin (plugins.fused_ops.enabled=false)."
        )
    return model_type, FAMILIES[model_type]


def apply_patches(
    model: torch.nn.Module, kinds: Iterable[str] = KINDS, *, moe_backend: str = "auto"
) -> PatchSet:
    """Patch ``model``'s modules with the fused forwards of ``kinds``; returns the undo handle.

    Args:
        model: a transformers causal LM of a family in the table (peft wrappers are fine).
        kinds: subset of :data:`KINDS`.
        moe_backend: expert kernels of the ``moe`` kind (``auto``, ``triton``, ``grouped_mm``,
            ``mm_loop``, ``loop``; see :func:`turbotune.moe.resolve_backend`).
    """
    from turbotune.patches import forwards, layers

    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown patch kinds {sorted(unknown)}; choose from {KINDS}")
    if "add_norm" in kinds and "rms_norm" not in kinds:
        raise ValueError("patch kind 'add_norm' fuses the RMSNorm kernels: it needs 'rms_norm'")
    name, fam = family_of(model)
    patches = PatchSet(name)
    # Projections of an MLP whose whole forward is fused need no patch of their own.
    in_fused_mlp = _fused_mlp_children(model, fam) if "swiglu" in kinds else set()
    clamped = _norms_clamped_in_place(model)
    for module in model.modules():
        cls = type(module).__name__
        if "add_norm" in kinds and layers.is_standard_decoder_layer(module, fam):
            patches.bind(module, "add_norm", layers.decoder_layer_forward(fam, type(module)))
        elif "rms_norm" in kinds and cls in fam.norms and id(module) not in clamped:
            patches.bind(module, "rms_norm", forwards.rms_norm_forward(fam))
        elif "swiglu" in kinds and cls in fam.mlps:
            patches.bind(
                module, "swiglu", forwards.gated_mlp_forward(fam, fuse_lora="lora" in kinds)
            )
        elif "moe" in kinds and cls in fam.experts:
            from turbotune.moe.patch import experts_forward

            patches.bind(module, "moe", experts_forward(moe_backend))
        elif "cross_entropy" in kinds and cls == fam.causal_lm:
            patches.bind(module, "cross_entropy", forwards.causal_lm_forward(fam))
        elif cls in fam.attentions and (attention := _attention_kinds(module, fam, kinds)):
            rope, qkv = "rope" in attention, "lora_qkv" in attention
            patches.bind(module, attention, forwards.attention_forward(fam, rope=rope, qkv=qkv))
        elif "lora" in kinds and forwards.is_lora_linear(module) and id(module) not in in_fused_mlp:
            patches.bind(module, "lora", forwards.lora_linear_forward)
    if patches.counts.get("rope"):
        patches.swap_global(fam.module, fam.rope_fn, forwards.rotary_dispatcher)
    if patches.counts.get("cross_entropy") and hasattr(
        importlib.import_module(packing.PROBE[0]), packing.PROBE[1]
    ):
        patches.swap_global(*packing.PROBE, packing.probe_without_sync)
    return patches


def _norms_clamped_in_place(model: torch.nn.Module) -> set[int]:
    """Ids of the q/k norms whose output the attention clamps in place (OLMoE's ``clip_qkv``):
    the fused norm's output is a view made inside an autograd Function, which autograd forbids
    modifying in place, so those norms keep transformers' forward."""
    if getattr(getattr(model, "config", None), "clip_qkv", None) is None:
        return set()
    return {
        id(norm)
        for module in model.modules()
        for norm in (getattr(module, "q_norm", None), getattr(module, "k_norm", None))
        if isinstance(norm, torch.nn.Module)
    }


def _attention_kinds(module: torch.nn.Module, fam: Family, kinds: set[str]) -> tuple[str, ...]:
    """What a patched attention forward brings: the fused rotary, and q/k/v as one LoRA op
    (when its projections carry adapters)."""
    from turbotune.patches.forwards import is_lora_linear

    if not fam.rope_fn:
        return ()
    rope = ("rope",) if "rope" in kinds else ()
    projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    qkv = "lora" in kinds and any(p is not None and is_lora_linear(p) for p in projections)
    return rope + (("lora_qkv",) if qkv else ())


def _fused_mlp_children(model: torch.nn.Module, fam: Family) -> set[int]:
    """``id`` of every module inside one of the family's gated MLPs."""
    return {
        id(child)
        for module in model.modules()
        if type(module).__name__ in fam.mlps
        for child in module.modules()
    }
