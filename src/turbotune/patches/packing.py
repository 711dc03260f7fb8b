"""Skip transformers' packed-sequence probe when the caller gave no positions.

Design note. With no attention mask, transformers 5's ``create_causal_mask`` looks for packed
sequences in ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and decides with
``(mask[:, -1] == 0).all()`` in Python: a host-device synchronization in every training step.
After it the GPU idles until the host has launched the next kernels (~1-2 ms per step of the
Llama-8B reference workload, whose step otherwise never waits for the host). When the caller
passed neither ``position_ids`` nor an attention mask nor a cache, the model derives the
positions from ``cache_position``, a plain ``arange``, for which the probe always answers
"not packed" (``None``). The fused causal-LM forward (``patches/forwards.py``) knows that case
and says so through :func:`positions_are_default`; the probe, swapped in by the patch engine
(reference-counted like the rotary function), then returns ``None`` without looking. In every
other case the original probe runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["PROBE", "positions_are_default", "probe_without_sync"]

PROBE = ("transformers.masking_utils", "find_packed_sequence_indices")
"""Module and name of the probe the engine swaps."""

_state = threading.local()


@contextlib.contextmanager
def positions_are_default(known: bool) -> Iterator[None]:
    """Within the block, the model's positions are its own ``arange`` (when ``known``)."""
    previous = getattr(_state, "default", False)
    _state.default = known
    try:
        yield
    finally:
        _state.default = previous


def probe_without_sync(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The probe, answering ``None`` (no packing) without a sync inside
    :func:`positions_are_default`."""

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        if getattr(_state, "default", False):
            return None
        return original(position_ids)

    find_packed_sequence_indices.__wrapped__ = original
    return find_packed_sequence_indices
