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

The two steps are :func:`adapter_first`, shared with the LoRA MLP's down projection on bases
used as stored (``ops/glu_lora_forward.py``); :func:`product` is its GEMM with a residual and a
bias folded into one ``addmm`` where possible.

``ENABLED = False`` keeps the base-then-adapter order (A/B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbotune.ops.lora_group import Layout, Slot, cast, placeholder, stacked_weight
from turbotune.ops.lora_stash import keep

__all__ = ["ENABLED", "adapter_first", "adapter_first_forward", "applies", "product"]

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
    return [adapter_first(x, weight, t, b, slot.scaling, slot.bias)], [t, a, b]


def adapter_first(
    x: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = residual + s t B^T + bias``, then ``y += x W^T``: the big GEMM reads ``y`` in its
    epilogue instead of a read-modify-write pass over ``y`` after it.

    Args:
        x: ``[M, in]``; w: ``[out, in]`` the base weight, ``x``'s dtype.
        t: ``[M, r]`` ``= x A^T``; b: ``[out, r]`` the adapter's ``B``, both ``x``'s dtype.
        scaling: the adapter's ``s``.
        bias: optional ``[out]`` (cast to ``t``'s dtype); residual: optional ``[M, out]``.

    Returns:
        ``y [M, out]``.
    """
    y = product(t, b.t(), residual, bias, alpha=scaling)  # rank r: one write of y
    return y.addmm_(x, w.t())


def product(
    x: torch.Tensor,
    w_t: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``residual + alpha x w_t + bias`` as one ``addmm`` where possible.

    Args:
        x: ``[M, K]``; w_t: ``[K, N]`` (a transposed weight view is fine).
        residual: optional ``[M, N]``: ``addmm`` copies it into the output and cuBLAS adds the
            product in its epilogue (the bias, if any, is then added in place).
        bias: optional ``[N]``, cast to ``x``'s dtype.
        alpha: the product's scale.

    Returns:
        ``[M, N]``, a new tensor.
    """
    bias = None if bias is None else cast(bias, x.dtype)
    if residual is not None:
        y = torch.addmm(residual, x, w_t, alpha=alpha)
        return y if bias is None else y.add_(bias)
    if bias is not None:
        return torch.addmm(bias, x, w_t, alpha=alpha)
    if alpha == 1.0:
        return torch.mm(x, w_t)
    # beta = 0: the one-element placeholder only lends a shape
    return torch.addmm(placeholder(x.dtype, x.device), x, w_t, beta=0, alpha=alpha)
