"""Decoder-layer forwards with each residual add fused into the RMSNorm after it.

Design note. transformers' pre-norm decoder layer is ``x = x + attn(norm1(x)); x = x +
mlp(norm2(x))``: two residual adds in forward and two gradient sums in backward, each a full
pass over ``[tokens, hidden]``. :func:`decoder_layer_forward` runs the same layer through
:mod:`turbotune.ops.add_norm`: the first norm hands its input through as the residual (its
backward sums both gradients in one kernel), the second norm adds the attention output in its
own kernel. The layer's last add feeds the next layer, across the boundary that CUDA graphs
and checkpointing work on; a patched gated MLP takes it as ``residual`` and adds it inside its
down projection's GEMM (``ops/lora.lora_mlp``; switch :data:`RESIDUAL_INTO_MLP`), other MLPs,
and layers with a residual multiplier, leave it a plain add. The patch engine binds it per
layer instance (kind ``add_norm``) for the families whose layers match
(``Family.decoder_layers``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from turbotune.patches.families import Family

__all__ = ["decoder_layer_forward", "is_standard_decoder_layer"]

# Off: the layer adds the MLP's output to the residual itself (A/B of the add in the GEMM: on
# is 1.005x of the whole 4x1024 step on an H100, session 5).
RESIDUAL_INTO_MLP = True


def decoder_layer_forward(fam: Family, layer_cls: type) -> Callable[..., torch.Tensor]:
    """transformers' pre-norm ``<Family>DecoderLayer.forward`` (5.x) with each residual add fused
    into the RMSNorm after it (:mod:`turbotune.ops.add_norm`); the layer's last add goes to a
    patched MLP as ``residual`` (it feeds the next layer). Positional arguments, hooks on a
    norm or ``ops.add_norm.ENABLED = False`` (A/B switch) take the original forward.

    The original passes every named parameter of its signature (``attention_mask``,
    ``position_ids``, ``use_cache``..., with their defaults) and ``**kwargs`` to the attention;
    so does this one, for each family's own signature. Gradient checkpointing: transformers up to
    ~5.17 checkpoints in ``GradientCheckpointingLayer.__call__``, around whatever forward is
    bound; later versions wrap the *class's* ``forward``, which an instance forward replaces, so
    there this forward checkpoints itself the same way.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from turbotune.ops import add_norm

    params = list(inspect.signature(layer_cls.forward).parameters.values())[2:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {p.name: p.default for p in params if p.kind in named}
    checkpoints_itself = issubclass(layer_cls, GradientCheckpointingLayer) and (
        "__call__" not in GradientCheckpointingLayer.__dict__
    )
    fused = _fused_layer(fam, defaults)

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        mods = self._modules
        if (
            args
            or not add_norm.ENABLED
            or _hooked(mods["input_layernorm"])
            or _hooked(mods["post_attention_layernorm"])
        ):
            return self._turbotune_original_forward(hidden_states, *args, **kwargs)
        if checkpoints_itself and self.gradient_checkpointing and self.training:
            # What transformers' wrapper does: no cache written twice by the recomputation.
            if kwargs.get("use_cache"):
                kwargs = {**kwargs, "use_cache": False}
            if kwargs.get("past_key_values") is not None and not self._can_checkpoint_with_cache:
                kwargs = {**kwargs, "past_key_values": None}
            return self._gradient_checkpointing_func(
                functools.partial(fused, self, **kwargs), hidden_states
            )
        return fused(self, hidden_states, **kwargs)

    return forward


def _fused_layer(fam: Family, defaults: dict[str, Any]) -> Callable[..., torch.Tensor]:
    from turbotune.ops.add_norm import add_rms_norm, rms_norm_with_residual

    eps_attr, offset = fam.norm_eps_attr, fam.norm_offset
    mlp_attr, mult_attr = fam.layer_mlp, fam.residual_multiplier_attr

    def fused(self: torch.nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        mods = self._modules
        norm1, norm2 = mods["input_layernorm"], mods["post_attention_layernorm"]
        multiplier = getattr(self, mult_attr) if mult_attr else None
        residual, x = rms_norm_with_residual(
            hidden_states, norm1.weight, getattr(norm1, eps_attr), offset
        )
        attn = mods["self_attn"](hidden_states=x, **{**defaults, **kwargs})
        x = attn[0] if isinstance(attn, tuple) else attn
        residual, x = add_rms_norm(
            residual, x, norm2.weight, getattr(norm2, eps_attr), offset, multiplier=multiplier
        )
        mlp = mods[mlp_attr]
        if (
            RESIDUAL_INTO_MLP
            and multiplier is None
            and getattr(mlp.forward, "takes_residual", False)
            and not _hooked(mlp)  # a hook on the MLP expects its own output, not the sum
        ):
            return mlp(x, residual=residual)  # the add rides on the down projection's GEMM
        x = mlp(x)
        return residual + (x if multiplier is None else x * multiplier)

    return fused


def is_standard_decoder_layer(module: torch.nn.Module, fam: Family) -> bool:
    """A decoder layer of the family whose parts :func:`decoder_layer_forward` reads are there:
    both norms of a norm class of the family (their RMSNorm semantics are the fused op's)."""
    if type(module).__name__ not in fam.decoder_layers:
        return False
    mods = module._modules
    norms = [mods.get("input_layernorm"), mods.get("post_attention_layernorm")]
    return (
        all(n is not None and type(n).__name__ in fam.norms for n in norms)
        and mods.get("self_attn") is not None
        and mods.get(fam.layer_mlp) is not None
        and (fam.residual_multiplier_attr is None or hasattr(module, fam.residual_multiplier_attr))
    )


def _hooked(module: torch.nn.Module) -> bool:
    # A hook on a norm expects its forward to run; the fused layer never calls it.
    return bool(module._forward_hooks or module._forward_pre_hooks)
