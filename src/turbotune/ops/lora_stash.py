"""Dequantized weights handed from an activation-checkpoint recomputation to its own backward.

Design note. The fused LoRA ops dequantize a frozen base weight in forward and again in
backward, so no dense weight outlives its matmul. Under activation checkpointing the forward
runs twice (once in the forward pass, once recomputed inside the backward pass, just before the
layer's backward), so a 4-bit weight is dequantized three times per step. The recomputed
forward knows it is one (autograd is executing a graph: ``torch._C._current_graph_task_id() !=
-1``) and keeps its stacked or folded weight here; the backward of the same group, which runs
moments later, takes it instead of dequantizing again. The backward uses the ORIGINAL forward's
autograd node (the recomputation only refills its saved tensors), so the hand-over cannot go
through ``ctx``: it is keyed on the group's weight sources and dtype, and checked against the
adapters' ``B`` versions (the folded weight holds ``s B``).

Memory: entries live from a layer's recomputation to its backward, one decoder layer's dense
weights at most in practice; the stash holds at most :data:`MAX_ENTRIES` (oldest dropped: a
backward that finds nothing dequantizes as before). Outside a backward nothing is kept, and
``TURBOTUNE_LORA_STASH=0`` turns it off. One training thread is assumed (as the ops' autograd
functions are used by HF Trainer).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ENABLED", "MAX_ENTRIES", "clear", "holds", "keep", "recomputing", "take"]

ENABLED = os.environ.get("TURBOTUNE_LORA_STASH", "1").lower() not in ("0", "false", "no", "off")
# A decoder layer has four groups (q/k/v, o, gate/up, down); room for two layers.
MAX_ENTRIES = 8

_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_STASH: OrderedDict[tuple, tuple[tuple, tuple, torch.Tensor]] = OrderedDict()


def recomputing() -> bool:
    """Whether the current forward runs inside a backward pass (a checkpoint recomputation)."""
    return _graph_task_id is not None and _graph_task_id() != -1


def _key(kind: str, slots: Sequence[Any], dtype: torch.dtype) -> tuple:
    return (kind, dtype, *[id(s.base) for s in slots])


def _versions(slots: Sequence[Any]) -> tuple:
    # Storage and version counter, not id(): backward sees B unpacked from the saved tensors (a
    # new Python object under checkpointing's hooks, sharing both with the parameter).
    return tuple(None if s.B is None else (s.B.data_ptr(), s.B._version) for s in slots)


def keep(kind: str, slots: Sequence[Any], weight: torch.Tensor) -> None:
    """In a recomputed forward, keep the group's dense ``weight`` for its backward.

    Args:
        kind: which buffer (``"stacked"`` or ``"folded"``): backward asks for the same.
        slots: the group's projections (``lora_group.Slot``).
        weight: the buffer the forward built, not modified afterwards.
    """
    if not ENABLED or not recomputing():
        return
    key = _key(kind, slots, weight.dtype)
    _STASH.pop(key, None)
    _STASH[key] = (tuple(s.base for s in slots), _versions(slots), weight)
    while len(_STASH) > MAX_ENTRIES:
        _STASH.popitem(last=False)


def take(kind: str, slots: Sequence[Any], dtype: torch.dtype) -> torch.Tensor | None:
    """The weight :func:`keep` left for this group, removed from the stash, or None."""
    if not _STASH:  # the common case without checkpointing: one check
        return None
    entry = _STASH.pop(_key(kind, slots, dtype), None)
    if entry is None:
        return None
    bases, versions, weight = entry
    if any(b is not s.base for b, s in zip(bases, slots)) or versions != _versions(slots):
        return None
    return weight


def holds(kind: str, slots: Sequence[Any], dtype: torch.dtype) -> bool:
    """Whether :func:`take` may find a weight for this group (no check of the entry)."""
    return bool(_STASH) and _key(kind, slots, dtype) in _STASH


def clear() -> None:
    """Drop every kept weight (tests; or to free memory after an interrupted backward)."""
    _STASH.clear()
