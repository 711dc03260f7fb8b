"""A lone LoRA projection's forward with the adapter term written first, so it costs no pass.

Design note. The shared layout (``ops/lora_group.py``) computes a lone projection (o_proj, or a
down projection outside the fused MLP) as ``y = x W^T`` and then ``y += s t B^T``: the rank-``r``
update is a memory-bound read and write of all of ``y`` (``[4096, 4096]`` bf16 at Llama-8B shape:
~26 us on an H100). Written the other way round::

    y = s t B^T (+ b)          one write of y by a rank-r GEMM
    y = y + x W^T              the big GEMM reads y in its epilogue (beta = 1)

the read of ``y`` rides in the epilogue of a compute-bound GEMM, where it is nearly free, and the
only memory-bound pass left is the rank-``r`` GEMM's write. ``t = x A^T`` is computed as before
and the saved tensors are exactly those of ``lora_group.lora_forward`` (``[t, A, B]``), so the
backward does not know which forward ran. Rounding differs from the old order only in which sum
is rounded first (``round(round(s t B^T) + x W^T)`` instead of ``round(round(x W^T) + s t B^T)``).

``ENABLED = False`` keeps the base-then-adapter order (A/B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbotune.ops.lora_group import Layout, Slot, cast, placeholder, stacked_weight
from turbotune.ops.lora_stash import keep

__all__ = ["ENABLED", "adapter_first_forward", "applies"]

# Off: y = x W^T, then y += s t B^T (lora_group.base_forward + lora_forward).
ENABLED = True


def applies(slots: Sequence[Slot], layout: Layout, stacked: bool) -> bool:
    """A lone projection with a dropout-free adapter in the shared (dequantizing) layout."""
    return (
        ENABLED
        and not stacked
        and len(slots) == 1
        and layout.adapters == (0,)
        and layout.shared
        and not layout.fold
        and not layout.direct
    )


def adapter_first_forward(
    x: torch.Tensor, slots: Sequence[Slot], layout: Layout
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``y = x W^T + b + s (x A^T) B^T`` with the adapter term written first.

    Args:
        x: ``[M, in]`` in the compute dtype.
        slots: the one projection (see :func:`applies`).

    Returns:
        ``[y]`` (``[M, out]``) and what ``lora_group.lora_backward`` needs: ``[t, A, B]`` in
        the compute dtype, as ``lora_group.lora_forward`` saves them.
    """
    slot = slots[0]
    dtype = x.dtype
    weight, _ = stacked_weight(slots, layout, dtype, x.device)
    keep("stacked", slots, weight)  # a checkpoint recomputation: its backward reuses it
    a, b = cast(slot.A, dtype), cast(slot.B, dtype)
    t = torch.mm(x, a.t())
    if slot.bias is None:  # beta = 0: the one-element placeholder only lends a shape
        y = torch.addmm(placeholder(dtype, x.device), t, b.t(), beta=0, alpha=slot.scaling)
    else:
        y = torch.addmm(cast(slot.bias, dtype), t, b.t(), alpha=slot.scaling)
    y.addmm_(x, weight.t())
    return [y], [t, a, b]
