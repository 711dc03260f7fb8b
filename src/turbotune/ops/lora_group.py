"""The maths of a group of LoRA projections that share one input (q/k/v, or gate/up).

Design note. The projections of a group are computed as one: their frozen weights are
dequantized into one row-stacked ``[sum out_i, in]`` buffer (one allocation, no per-weight
temporaries), and the input gradient is ONE matmul ``dx = [dy_1 | dy_2 | ...] W_stacked``
instead of one per projection. Without dropout the adapters' down projections are one matmul
too: ``T = x [A_1; A_2; ...]^T`` (``[M, sum r_i]``), and in backward ``dA = G^T x`` and
``dx += G A_stacked`` with ``G = [s_1 dy_1 B_1 | s_2 dy_2 B_2 | ...]``. Only the rank-``r``
up projections stay per adapter (their outputs differ).

Plain dense weights already in the compute dtype skip the stacked buffer (a copy that gains
nothing there): ``ops/lora_direct.py`` runs them one matmul each, with the adapter maths below.

Outputs come either as one ``[M, sum out_i]`` tensor (``stacked=True``: the MLP, which keeps
``[e | u]`` and gets ``[de | du]`` written over it) or as separate tensors, one matmul each over
row blocks of the stacked weight (q, k, v: a consumer that saves ``v``, like SDPA, must not keep
a buffer holding q and k alive, so no views of one buffer are handed out).

Notation (see ``ops/lora.py``): ``t = D(x) A^T`` (saved, unscaled), ``y = x W^T + b + s t B^T``;
backward ``g = s dy B``, ``dB = s dy^T t``, ``dA = g^T D(x)``, ``dx = dy W + D(g A)``. Scalings
ride on the matmuls' ``alpha`` (``beta = 0`` ignores the placeholder input, which only lends its
shape), so no elementwise kernel is spent on them. ``A``/``B`` are cast to the compute dtype once
in forward and the casts saved for backward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from turbotune.ops.lora_dropout import dropout_keep, dropped, slot_keep
from turbotune.ops.lora_stash import keep, take
from turbotune.quant.weights import dense_weight, weight_shape

__all__ = [
    "Layout",
    "Needs",
    "Slot",
    "adjacent_columns",
    "base_backward",
    "base_forward",
    "cast",
    "dropout_keep",
    "layout_of",
    "lora_backward",
    "lora_forward",
    "placeholder",
    "scaled_db",
    "split_da",
    "stack_cast",
    "stacked_weight",
]


class Slot(NamedTuple):
    """One projection as the autograd functions see it (tensors unpacked from the inputs)."""

    base: Any
    A: torch.Tensor | None
    B: torch.Tensor | None
    bias: torch.Tensor | None
    scaling: float
    dropout: float
    seed: int


class Needs(NamedTuple):
    """Which gradients one projection's backward must produce."""

    x: bool
    A: bool
    B: bool
    bias: bool


class Layout(NamedTuple):
    """Static facts of a group, found in forward and kept for backward.

    Attributes:
        rows: ``(start, stop)`` of each projection's rows in the stacked weight (and its columns
            in a stacked output).
        stackable: every weight's shape is known without dequantizing (else: dequantize, cat).
        adapters: indices of the projections with an adapter.
        ranks: ``(start, stop)`` of each adapter's columns in ``T`` (rows in ``A_stacked``).
        shared: the adapters' down projections run as one matmul (no dropout anywhere).
        fold: the adapters ride inside the base matmuls (``ops/lora_fold.py``): a shared group
            of several projections whose weights stack (and split by whole bytes).
        wide: a lone shared projection with ``in >= 2 out`` (the MLP's down projection): its
            ``dx`` is one matmul ``[dy | g] [W; A]`` (``ops/lora_fold.py``).
        direct: every weight is used as stored, one matmul per projection (plain dense weights
            in the compute dtype: ``ops/lora_direct.py``); ``fold`` and ``wide`` are off then.
        n_in: ``in_features`` (0 when not ``stackable``).
    """

    rows: tuple[tuple[int, int], ...]
    stackable: bool
    adapters: tuple[int, ...]
    ranks: tuple[tuple[int, int], ...]
    shared: bool
    fold: bool
    wide: bool
    direct: bool = False
    n_in: int = 0


def _spans(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    spans, start = [], 0
    for size in sizes:
        spans.append((start, start + size))
        start += size
    return tuple(spans)


# Fold adapters into the base matmuls where it pays (``ops/lora_fold.py``). The switch is for
# A/B measurements: TURBOTUNE_LORA_FOLD=0 keeps every adapter beside its base matmul.
FOLD_ADAPTERS = os.environ.get("TURBOTUNE_LORA_FOLD", "1").lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def layout_of(slots: Sequence[Slot]) -> Layout:
    shapes = [weight_shape(s.base) for s in slots]
    stackable = all(shape is not None for shape in shapes)
    rows = _spans([shape[0] for shape in shapes]) if stackable else ()
    adapters = tuple(i for i, s in enumerate(slots) if s.A is not None)
    ranks = _spans([slots[i].A.shape[0] for i in adapters])
    shared = all(slots[i].dropout == 0.0 for i in adapters)
    in_even = stackable and shapes[0][1] % 2 == 0
    fold = FOLD_ADAPTERS and shared and bool(adapters) and len(slots) > 1 and in_even
    wide = FOLD_ADAPTERS and shared and bool(adapters) and len(slots) == 1 and stackable
    wide = wide and shapes[0][1] >= 2 * shapes[0][0]
    n_in = shapes[0][1] if stackable else 0
    return Layout(rows, stackable, adapters, ranks, shared, fold, wide, False, n_in)


# ---- small helpers of the hot path (each runs several times per projection per step) ----


def adjacent_columns(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``[t_1 | t_2 | ...]`` as ONE view when the tensors already are adjacent column blocks of
    one buffer, else None (the caller concatenates).

    Adjacent means: 2-D, one dtype, device and storage, the same rows and row stride, unit
    column stride, and each block starting where the previous one ends (the rotary backward of
    ``ops/rope_qkv.py`` leaves q/k/v gradients so).

    Args:
        tensors: ``[M, n_i]`` each.

    Returns:
        the ``[M, sum n_i]`` view (sharing the tensors' memory), or None.
    """
    first = tensors[0]
    if first.dim() != 2 or first.stride(1) != 1 or first.numel() == 0:
        return None
    rows, row_stride = first.shape[0], first.stride(0)
    storage = first.untyped_storage().data_ptr()
    step = first.element_size()
    end = first.data_ptr() + first.shape[1] * step
    for t in tensors[1:]:
        if (
            t.dim() != 2
            or t.shape[0] != rows
            or t.stride() != (row_stride, 1)
            or t.dtype != first.dtype
            or t.device != first.device
            or t.data_ptr() != end
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        end += t.shape[1] * step
    width = (end - first.data_ptr()) // step
    if rows > 1 and width > row_stride:  # the blocks would run into the next row
        return None
    return first.as_strided((rows, width), (row_stride, 1))


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the dispatcher round trip when ``t`` has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


_PLACEHOLDERS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached one-element input for ``addmm(..., beta=0)``: it broadcasts to any output shape
    and beta 0 ignores its value, so no ``[out, r]`` tensor is allocated just to lend a shape."""
    key = (dtype, device)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def split_da(
    d_a_all: torch.Tensor, slots: Sequence[Slot], layout: Layout, needs: Sequence[Needs], grads
) -> None:
    """Set ``grads[i] = (dA_i, dB_i)`` from the stacked ``[sum r_i, in]`` ``dA``: one cast for
    the group (to the adapters' common dtype), then contiguous row views."""
    dtypes = {slots[i].A.dtype for i in layout.adapters}
    if len(dtypes) == 1:
        d_a_all = cast(d_a_all, dtypes.pop())
    for k, i in enumerate(layout.adapters):
        if needs[i].A:
            r0, r1 = layout.ranks[k]
            grads[i] = (cast(d_a_all[r0:r1], slots[i].A.dtype), grads[i][1])


# ---- frozen base: y = x W^T + b, dx = dy W ----


def stacked_weight(
    slots: Sequence[Slot], layout: Layout, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """The group's weights stacked by rows, ``[sum out_i, in]`` in ``dtype`` on ``device`` (the
    compute device: the weights live there), and each projection's ``(start, stop)`` rows."""
    if len(slots) == 1:
        weight = dense_weight(slots[0].base, dtype)
        return weight, ((0, weight.shape[0]),)
    if not layout.stackable:  # a weight source that only tells its shape by dequantizing
        parts = [dense_weight(s.base, dtype) for s in slots]
        return torch.cat(parts), _spans([p.shape[0] for p in parts])
    weight = torch.empty((layout.rows[-1][1], layout.n_in), dtype=dtype, device=device)
    for slot, (start, stop) in zip(slots, layout.rows):
        dense_weight(slot.base, dtype, out=weight[start:stop])
    return weight, layout.rows


def base_forward(
    x: torch.Tensor, slots: Sequence[Slot], layout: Layout, stacked: bool
) -> torch.Tensor | list[torch.Tensor]:
    """``x W_i^T + b_i`` of every projection from one stacked dequantized weight.

    Returns:
        one ``[M, sum out_i]`` tensor if ``stacked``, else a list of ``[M, out_i]`` tensors.
    """
    weight, rows = stacked_weight(slots, layout, x.dtype, x.device)
    keep("stacked", slots, weight)  # a checkpoint recomputation: its backward reuses it
    if stacked:
        bias = _stacked_bias(slots, rows, x.dtype)
        return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    outs = []
    for slot, (start, stop) in zip(slots, rows):
        w = weight[start:stop].t()
        outs.append(
            torch.mm(x, w) if slot.bias is None else torch.addmm(cast(slot.bias, x.dtype), x, w)
        )
    return outs


def _stacked_bias(slots: Sequence[Slot], rows: Sequence[tuple[int, int]], dtype: torch.dtype):
    if all(s.bias is None for s in slots):
        return None
    if len(slots) == 1:
        return cast(slots[0].bias, dtype)
    device = next(s.bias for s in slots if s.bias is not None).device
    parts = [
        cast(s.bias, dtype)
        if s.bias is not None
        else torch.zeros(b - a, dtype=dtype, device=device)
        for s, (a, b) in zip(slots, rows)
    ]
    return torch.cat(parts)


def base_backward(dy: torch.Tensor, slots: Sequence[Slot], layout: Layout) -> torch.Tensor:
    """``dx = [dy_1 | dy_2 | ...] W_stacked``: one matmul for the whole group.

    Args:
        dy: ``[M, sum out_i]``, the output gradients side by side.
    """
    weight = take("stacked", slots, dy.dtype)  # left by a checkpoint recomputation
    if weight is None:
        weight, _ = stacked_weight(slots, layout, dy.dtype, dy.device)
    return torch.mm(dy, weight)


# ---- adapters ----


def lora_forward(
    x: torch.Tensor, slots: Sequence[Slot], layout: Layout, ys: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Add ``s_i D_i(x) A_i^T B_i^T`` to each ``ys[i]`` in place.

    Returns:
        the tensors backward needs: ``[T, A_stacked, B_1, B_2, ...]`` when shared, else
        ``[t_1, A_1, B_1, t_2, ...]`` per adapter (all in the compute dtype).
    """
    if not layout.adapters:
        return []
    dtype = x.dtype
    b_casts = [cast(slots[i].B, dtype) for i in layout.adapters]
    if layout.shared:
        a_stacked = stack_cast([slots[i].A for i in layout.adapters], dtype)
        t_all = torch.mm(x, a_stacked.t())
        for k, i in enumerate(layout.adapters):
            start, stop = layout.ranks[k]
            ys[i].addmm_(
                t_all.narrow(1, start, stop - start), b_casts[k].t(), alpha=slots[i].scaling
            )
        return [t_all, a_stacked, *b_casts]
    saved = []
    for k, i in enumerate(layout.adapters):
        slot, a = slots[i], cast(slots[i].A, dtype)
        t = torch.mm(dropped(x, slot_keep(x, slot), slot.dropout), a.t())
        ys[i].addmm_(t, b_casts[k].t(), alpha=slot.scaling)
        saved += [t, a, b_casts[k]]
    return saved


def stack_cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(tensors).to(dtype)`` as one kernel (the cast happens in the copy)."""
    if len(tensors) == 1:
        return cast(tensors[0], dtype)
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, tensors[0].shape[1]), dtype=dtype, device=tensors[0].device)
    return torch.cat(tensors, out=out)


def lora_backward(
    dys: Sequence[torch.Tensor],
    x: torch.Tensor,
    slots: Sequence[Slot],
    layout: Layout,
    saved: Sequence[torch.Tensor],
    dx: torch.Tensor | None,
    needs: Sequence[Needs],
) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The adapters' gradients; ``dx`` (the base part, or None) gets ``D(g A)`` added in place.

    Args:
        dys: ``[M, out_i]`` output gradient of each projection (views are fine).
        x: ``[M, in]`` the saved input.
        saved: what :func:`lora_forward` returned.
        dx: running input gradient, or None when ``x`` needs none.
        needs: per projection.

    Returns:
        ``{index: (dA, dB)}`` for the projections with an adapter, in the parameters' dtypes.
    """
    if not layout.adapters:
        return {}
    if layout.shared:
        return _shared_backward(dys, x, slots, layout, saved, dx, needs)
    grads = {}
    for k, i in enumerate(layout.adapters):
        t, a, b = saved[3 * k : 3 * k + 3]
        grads[i] = _one_backward(dys[i], x, t, a, b, slots[i], dx, needs[i])
    return grads


def scaled_db(dy: torch.Tensor, t: torch.Tensor, b: torch.Tensor, slot: Slot) -> torch.Tensor:
    """``dB = s dy^T t`` in ``B``'s dtype."""
    return cast(torch.addmm(b, dy.t(), t, beta=0, alpha=slot.scaling), slot.B.dtype)


def _shared_backward(dys, x, slots, layout, saved, dx, needs):
    t_all, a_stacked, *b_casts = saved
    need_g = dx is not None or any(needs[i].A for i in layout.adapters)
    g_all = torch.empty_like(t_all) if need_g else None
    grads = {}
    for k, i in enumerate(layout.adapters):
        start, stop = layout.ranks[k]
        slot, dy, b = slots[i], dys[i], b_casts[k]
        d_b = scaled_db(dy, t_all.narrow(1, start, stop - start), b, slot) if needs[i].B else None
        if need_g:  # G's columns are this adapter's s dy B
            g = g_all.narrow(1, start, stop - start)
            torch.addmm(g, dy, b, beta=0, alpha=slot.scaling, out=g)
        grads[i] = (None, d_b)
    if any(needs[i].A for i in layout.adapters):
        split_da(torch.mm(g_all.t(), x), slots, layout, needs, grads)
    if dx is not None:
        dx.addmm_(g_all, a_stacked)
    return grads


def _one_backward(dy, x, t, a, b, slot: Slot, dx, needs: Needs):
    """One adapter with its own dropout mask (regenerated from its seed)."""
    d_b = scaled_db(dy, t, b, slot) if needs.B else None
    if dx is None and not needs.A:
        return None, d_b
    g = torch.addmm(t, dy, b, beta=0, alpha=slot.scaling)
    keep = slot_keep(x, slot)
    d_a = cast(torch.mm(g.t(), dropped(x, keep, slot.dropout)), slot.A.dtype) if needs.A else None
    if dx is not None:
        if keep is None:
            dx.addmm_(g, a)
        else:
            dx.add_(torch.mm(g, a).mul_(keep), alpha=1.0 / (1.0 - slot.dropout))
    return d_a, d_b
