"""What a decoder layer's call hands its CUDA graphs (``ops/graphs.py``).

Design note. A graph replays fixed buffers, so a layer call is graphable only when its keyword
arguments split into tensors, which are copied into static buffers at each step (rotary
``cos``/``sin``, masks, positions), and plain constants, which are part of the captured
shape's key. ``flatten_kwargs`` makes that split (``None`` for anything else: a KV cache, a
per-batch Python object), ``rebuild_kwargs`` inverts it for the capture, and ``describe`` is
what a captured tensor is specialised to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["describe", "flatten_kwargs", "rebuild_kwargs"]

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype)


def flatten_kwargs(kwargs: dict[str, Any]) -> tuple[list[tuple[str, int]], list, tuple] | None:
    """``(tensor slots, tensors, constants)`` of a layer's keyword arguments, or None when a value
    is neither a tensor, a tuple of tensors nor a plain constant."""
    slots, tensors, constants = [], [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            slots.append((name, -1))
            tensors.append(value)
        elif (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(v, torch.Tensor) for v in value)
        ):
            for j, v in enumerate(value):
                slots.append((name, j))
                tensors.append(v)
        elif isinstance(value, _CONSTANT_TYPES):
            constants.append((name, value))
        else:
            return None
    return slots, tensors, tuple(constants)


def rebuild_kwargs(
    slots: Sequence[tuple[str, int]], tensors: Sequence[torch.Tensor], constants: tuple
) -> dict[str, Any]:
    """The keyword arguments back from ``flatten_kwargs``'s output (tensors in slot order)."""
    kwargs: dict[str, Any] = dict(constants)
    parts: dict[str, list] = {}
    for (name, j), t in zip(slots, tensors):
        if j < 0:
            kwargs[name] = t
        else:
            parts.setdefault(name, []).append(t)
    kwargs.update({name: tuple(ts) for name, ts in parts.items()})
    return kwargs


def describe(t: torch.Tensor) -> tuple:
    """What a captured graph is specialised to: shape, dtype, ``requires_grad``, device."""
    return (tuple(t.shape), t.dtype, t.requires_grad, t.device)
