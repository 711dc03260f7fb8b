"""Frozen base weights, however they are stored, as one dense ``[out, in]`` tensor on demand.

Design note. Fused LoRA ops dequantize the frozen base weight in forward and again in backward
instead of keeping a dense copy alive. They should not care whether the weight is a plain
tensor, a bitsandbytes 4-bit parameter or some other quantized format, so they only ever call
:func:`dense_weight`. A new format plugs in by giving its weight object a
``dequantize(dtype) -> Tensor`` method (the :class:`Dequantizable` protocol): nothing here or in
the ops changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from turbotune.ops.nf4 import dequantize_nf4


@runtime_checkable
class Dequantizable(Protocol):
    """A quantized weight that can rebuild its dense ``[out_features, in_features]`` matrix."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor: ...


class Packed4bitWeight(NamedTuple):
    """bitsandbytes 4-bit storage held outside a ``Params4bit`` (e.g. loaded from a checkpoint).

    Attributes:
        data: packed nibbles, any ``quant_storage`` dtype.
        quant_state: its bitsandbytes ``QuantState``.
    """

    data: torch.Tensor
    quant_state: Any

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.data, self.quant_state, dtype)


# Anything dense_weight accepts: a tensor (dense or bnb Params4bit), a module with a .weight
# (nn.Linear, bnb Linear4bit), or a Dequantizable object.
BaseWeight = torch.Tensor | nn.Module | Dequantizable


def _bnb_quant_state(weight: torch.Tensor, module: nn.Module | None) -> Any:
    """The 4-bit ``QuantState`` of a bitsandbytes weight, or None for a dense one."""
    if getattr(weight, "bnb_quantized", True) is False:
        return None  # a Params4bit not yet moved to a device still holds dense values
    state = getattr(weight, "quant_state", None)
    if state is None and module is not None:
        # FSDP and some copies drop the attribute from the parameter; Linear4bit keeps a copy.
        state = getattr(module, "quant_state", None)
    return state


def dense_weight(source: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of ``source`` in ``dtype``, without autograd history.

    Args:
        source: an ``nn.Linear``-like module (its ``.weight``), a tensor (a bitsandbytes
            ``Params4bit`` is dequantized), or any object with ``.dequantize(dtype)``.
        dtype: the compute dtype wanted.

    Returns:
        ``[out_features, in_features]`` tensor of ``dtype`` (the stored tensor itself when it
        already has that dtype: callers must not modify it in place).

    Raises:
        TypeError: if ``source`` is none of the above.
    """
    module = None
    if isinstance(source, nn.Module) and not isinstance(source, Dequantizable):
        module, source = source, source.weight
    if isinstance(source, torch.Tensor):
        state = _bnb_quant_state(source, module)
        if state is not None:
            return dequantize_nf4(source, state, dtype)
        return source.detach().to(dtype)
    if isinstance(source, Dequantizable):
        return source.dequantize(dtype)
    raise TypeError(
        f"{type(source).__name__} is not a weight source: expected a tensor, a module with a "
        "`.weight`, or an object with `.dequantize(dtype)`"
    )
