"""Frozen base weights, however they are stored, as one dense ``[out, in]`` tensor on demand.

Design note. Fused LoRA ops dequantize the frozen base weight in forward and again in backward
instead of keeping a dense copy alive. They should not care whether the weight is a plain
tensor, a bitsandbytes 4-bit parameter or some other quantized format, so they only ever call
:func:`dense_weight`. A new format plugs in by giving its weight object a
``dequantize(dtype) -> Tensor`` method (the :class:`Dequantizable` protocol): nothing here or in
the ops changes. ``out=`` lets a fused op dequantize several projections that share an input
(q, k, v) into one stacked buffer, so that their backward is a single matmul.

This runs twice per projection per training step, so the dispatch is decided once per *type*
(the protocol ``isinstance`` is slow) and the 4-bit launch facts are cached by ``ops.nf4``.
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

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_nf4(self.data, self.quant_state, dtype, out=out)


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


# How each type of weight source is read, decided once per type: ``isinstance`` against the
# runtime-checkable protocol walks the protocol's members (and nn.Module.__getattr__) on every
# call, which cost more than the rest of a fused projection's Python.
_TENSOR, _MODULE, _DEQUANTIZE, _OTHER = range(4)
_SOURCE_KIND: dict[type, int] = {}


def _source_kind(cls: type) -> int:
    kind = _SOURCE_KIND.get(cls)
    if kind is None:
        if issubclass(cls, torch.Tensor):
            kind = _TENSOR
        elif callable(getattr(cls, "dequantize", None)):
            kind = _DEQUANTIZE
        elif issubclass(cls, nn.Module):
            kind = _MODULE
        else:
            kind = _OTHER  # maybe an instance attribute: checked per call
        _SOURCE_KIND[cls] = kind
    return kind


def _module_weight(module: nn.Module) -> Any:
    weight = module._parameters.get("weight")
    return weight if weight is not None else module.weight


def _unwrap(source: BaseWeight) -> tuple[nn.Module | None, Any, int]:
    """``(module or None, the weight itself, its kind)``: a module stands for its ``.weight``."""
    kind = _source_kind(type(source))
    if kind != _MODULE:
        return None, source, kind
    weight = _module_weight(source)
    return source, weight, _source_kind(type(weight))


def dense_weight(
    source: BaseWeight, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense weight of ``source`` in ``dtype``, without autograd history.

    Args:
        source: an ``nn.Linear``-like module (its ``.weight``), a tensor (a bitsandbytes
            ``Params4bit`` is dequantized), or any object with ``.dequantize(dtype)``.
        dtype: the compute dtype wanted.
        out: optional contiguous ``[out_features, in_features]`` tensor of ``dtype`` to write
            into (e.g. a row block of several projections' stacked weights).

    Returns:
        ``[out_features, in_features]`` tensor of ``dtype`` (``out`` when given; else possibly
        the stored tensor itself when it already has that dtype: callers must not modify it in
        place).

    Raises:
        TypeError: if ``source`` is none of the above.
    """
    module, source, kind = _unwrap(source)
    if kind == _TENSOR:
        state = _bnb_quant_state(source, module)
        if state is not None:
            return dequantize_nf4(source, state, dtype, out=out)
        dense = source.detach()
    elif type(source) is Packed4bitWeight:
        return source.dequantize(dtype, out)
    elif kind == _DEQUANTIZE or hasattr(source, "dequantize"):
        if out is not None and getattr(source, "dequantize_accepts_out", False):
            return source.dequantize(dtype, out=out)  # straight into the buffer (HQQ)
        dense = source.dequantize(dtype)
    else:
        raise TypeError(
            f"{type(source).__name__} is not a weight source: expected a tensor, a module with a "
            "`.weight`, or an object with `.dequantize(dtype)`"
        )
    return dense.to(dtype) if out is None else out.copy_(dense)


def plain_weight(source: BaseWeight) -> torch.Tensor | None:
    """The stored tensor of a plain (not quantized) dense source, or None for any other source.

    The fused LoRA ops use such a weight as it is, in their matmuls, when it already has the
    compute dtype (``ops/lora_direct.py``): copying it into a stacked buffer would cost a full
    pass over the weight and gain nothing. The tensor may carry autograd state; the ops read it
    inside their autograd functions, where no graph is built.
    """
    module, source, kind = _unwrap(source)
    if kind != _TENSOR or _bnb_quant_state(source, module) is not None:
        return None
    return source


def weight_shape(source: BaseWeight) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a weight source without dequantizing it, or None when
    only dequantizing would tell (a :class:`Dequantizable` without a ``shape``)."""
    module, source, kind = _unwrap(source)
    if kind == _TENSOR:
        state = _bnb_quant_state(source, module)
        return tuple(state.shape) if state is not None else tuple(source.shape)
    shape = getattr(source, "shape", None)
    if shape is None:
        state = getattr(source, "quant_state", None)
        shape = getattr(state, "shape", None)
    return tuple(shape) if shape is not None else None
