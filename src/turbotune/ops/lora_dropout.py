"""LoRA dropout masks, regenerated from a seed instead of saved.

Design note. peft's dropout keeps a ``[tokens, in]`` mask per adapter until backward. The fused
ops draw a boolean keep mask from a seed (``ops/lora.py``'s ``dropout_seed``, one per call,
plus the projection's index in its group) inside a forward or backward call, so backward
regenerates the same mask and only the seed is saved. Split from ``ops/lora_group.py``, which
re-exports ``dropout_keep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from turbotune.ops.lora_group import Slot

__all__ = ["dropout_keep", "dropped", "slot_keep"]


def dropout_keep(shape: Sequence[int], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep mask ``m`` (True with probability ``1 - p``) drawn from ``seed``.

    The projection with index ``j`` in a fused call (q, k, v = 0, 1, 2; gate, up, down = 0, 1, 2)
    uses ``seed + j``, so each adapter gets its own mask, as with peft's separate dropouts. The
    mask lives only inside one forward or backward call (1 byte per element).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.empty(tuple(shape), device=device, dtype=torch.bool)
    return keep.bernoulli_(1.0 - p, generator=gen)


def slot_keep(x: torch.Tensor, slot: Slot) -> torch.Tensor | None:
    """The keep mask of ``slot``'s adapter over ``x`` (None: no adapter or no dropout)."""
    if slot.A is None or slot.dropout == 0.0:
        return None
    return dropout_keep(x.shape, slot.dropout, slot.seed, x.device)


def dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``D(x) = x * m / (1 - p)``: ``x * m`` is exact, so one rounding, like ``F.dropout``."""
    return x if keep is None else (x * keep).mul_(1.0 / (1.0 - p))
