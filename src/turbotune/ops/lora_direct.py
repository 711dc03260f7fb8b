"""LoRA groups over plain dense weights already in the compute dtype: the weights used as stored.

Design note. For a quantized base (NF4, GPTQ, HQQ) the dequantizer must write a buffer anyway,
so writing it as one row-stacked (``ops/lora_group.py``) or folded (``ops/lora_fold.py``) weight
is free. A plain bf16 base in a bf16 run needs no buffer: stacking or folding it costs a full
read and write of every frozen weight, in forward and again in backward (measured on an H100 at
Llama-3.1-8B shapes, 1 x 4096 tokens: ~25 ms of a ~290 ms step). Here each projection runs
against its own weight instead:

forward::

    y_i = x W_i^T + b_i                (column blocks of one output when it is stacked)
    y_i += s_i t_i B_i^T               (t = x A^T: ``lora_group.lora_forward``)

backward::

    dx = dy_1 W_1 + dy_2 W_2 + ...     (one mm, then addmm_ with beta = 1)
    dx += D(g A),  dA, dB              (``lora_group.lora_backward``)

That is not free either: the adapter term reads and writes each output once more, and each
further projection of a group reads and writes ``dx`` once more. :func:`plan_group` weighs
both (memory traffic in elements, per token row) against the copies and keeps the copying
layout where it moves less, i.e. for many rows per step (``M`` above about ``in_features`` for
folded groups). The plan of a group is cached per weight source (weakly), so the per-call work
is a dict lookup and a dtype check.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from turbotune.ops import lora_group
from turbotune.ops.lora_group import Layout, Needs, Slot, layout_of, lora_backward, lora_forward
from turbotune.quant.weights import plain_weight, weight_shape

__all__ = [
    "DIRECT_BASES",
    "direct_backward",
    "direct_forward",
    "direct_input_backward",
    "direct_weights",
    "plan_group",
]

# "auto": use the weights as stored where the traffic model says it pays; "1": always (for
# plain weights in the compute dtype); "0": never (A/B measurements: TURBOTUNE_LORA_DIRECT).
DIRECT_BASES = os.environ.get("TURBOTUNE_LORA_DIRECT", "auto").lower()


class Plan(NamedTuple):
    """What :func:`plan_group` knows of a group without looking at its input.

    Attributes:
        layout: the copying layout (stacked or folded weights), as ``layout_of`` decides.
        direct: the same layout with ``direct=True`` (no fold, no widening), or None when a
            base is not a plain dense tensor.
        max_rows: the direct layout moves less memory up to this many input rows.
    """

    layout: Layout
    direct: Layout | None
    max_rows: float


_PLANS: dict[tuple, tuple[tuple, Plan]] = {}
_MAX_PLANS = 4096  # dead entries (freed models) are dropped when the cache grows past this


def _max_rows(layout: Layout, shapes: Sequence[tuple[int, int]], stacked: bool) -> float:
    """Rows ``M`` up to which the direct layout moves fewer elements than the copying one.

    Both layouts read ``x`` for ``T``, read ``dy`` for ``dB`` and add ``G A`` to ``dx``; the
    differences per step are: copies of every weight (fold: forward and backward, ``4 O I``;
    wide: backward, ``2 O I``), and per row: the copy of ``x`` into ``[x | T]`` (``2 I``) and of
    the separate ``dy_i`` into one (``2 O``) or of ``dy`` into ``[dy | g]`` (wide, ``2 O``),
    against the adapter's read-modify-write of ``y_i`` and read of ``dy_i`` for ``g``
    (``3 O_lora``, folded groups only: unfolded ones pay it too) and one read-modify-write of
    ``dx`` per further projection (``2 I (n - 1)``).
    """
    n_out, n_in = sum(s[0] for s in shapes), shapes[0][1]
    n = len(shapes)
    if layout.fold:
        lora_out = sum(shapes[i][0] for i in layout.adapters)
        copy, copy_row = 4 * n_out * n_in, 2 * n_in + (0 if stacked else 2 * n_out)
        direct_row = 3 * lora_out + 2 * n_in * (n - 1)
    elif layout.wide:
        copy, copy_row, direct_row = 2 * n_out * n_in, 2 * n_out, 2 * n_in
    elif n > 1:  # a stacked weight without folding (dropout): only the stacking differs
        copy, copy_row = 4 * n_out * n_in, 0 if stacked else 2 * n_out
        direct_row = 2 * n_in * (n - 1)
    else:  # a lone projection reads its weight as stored either way
        return math.inf
    extra = direct_row - copy_row
    return math.inf if extra <= 0 else copy / extra


def _new_plan(slots: Sequence[Slot], stacked: bool) -> Plan:
    layout = layout_of(slots)
    if DIRECT_BASES == "0" or any(plain_weight(s.base) is None for s in slots):
        return Plan(layout, None, 0.0)
    direct = layout._replace(fold=False, wide=False, direct=True)
    shapes = [weight_shape(s.base) for s in slots]
    max_rows = math.inf if DIRECT_BASES == "1" else _max_rows(layout, shapes, stacked)
    return Plan(layout, direct, max_rows)


def _cached_plan(slots: Sequence[Slot], stacked: bool, fold: bool) -> Plan:
    """The plan of a group, cached on the identity of its weight sources (checked through weak
    references, so a freed source's reused ``id`` never hits a stale entry)."""
    key = (stacked, fold, DIRECT_BASES)
    for s in slots:
        key += (id(s.base), 0 if s.A is None else s.A.shape[0], s.dropout == 0.0)
    hit = _PLANS.get(key)
    if hit is not None and all(ref() is s.base for ref, s in zip(hit[0], slots)):
        return hit[1]
    plan = _new_plan(slots, stacked)
    try:
        refs = tuple(weakref.ref(s.base) for s in slots)
    except TypeError:  # a source without weak references (a NamedTuple holder): not cached
        return plan
    if len(_PLANS) >= _MAX_PLANS:
        for k in [k for k, (rs, _) in _PLANS.items() if any(r() is None for r in rs)]:
            del _PLANS[k]
    _PLANS[key] = (refs, plan)
    return plan


def plan_group(
    slots: Sequence[Slot], x: torch.Tensor, stacked: bool
) -> tuple[Layout, list[torch.Tensor] | None]:
    """The layout a group runs with for input ``x``, and its weights when used as stored.

    Args:
        slots: the group's projections.
        x: ``[M, in]`` in the compute dtype.
        stacked: whether the group returns one ``[M, sum out_i]`` output.

    Returns:
        ``(layout, weights)``: ``weights`` are the stored ``[out_i, in]`` tensors when
        ``layout.direct``, else None.
    """
    # FOLD_ADAPTERS and DIRECT_BASES may be switched at run time (A/B): both are in the key.
    plan = _cached_plan(slots, stacked, lora_group.FOLD_ADAPTERS)
    if plan.direct is None or x.shape[0] > plan.max_rows:
        return plan.layout, None
    weights = direct_weights(slots, x.dtype)
    return (plan.direct, weights) if weights is not None else (plan.layout, None)


def direct_weights(slots: Sequence[Slot], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The stored weights of the group when every one is plain dense in ``dtype``, else None."""
    weights = []
    for slot in slots:
        weight = plain_weight(slot.base)
        if weight is None or weight.dtype != dtype:
            return None
        weights.append(weight)
    return weights


def direct_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    slots: Sequence[Slot],
    layout: Layout,
    stacked: bool,
) -> tuple[torch.Tensor | list[torch.Tensor], list[torch.Tensor]]:
    """``y_i = x W_i^T + b_i + s_i D_i(x) A_i^T B_i^T`` with each ``W_i`` as stored.

    Args:
        x: ``[M, in]`` in the compute dtype (that of every ``W_i``).
        weights: ``[out_i, in]`` each.
        stacked: one ``[M, sum out_i]`` output (each matmul writes its column block: cuBLAS
            takes the block's row stride as its leading dimension, no copy), else one each.

    Returns:
        the outputs and what :func:`direct_backward` needs (``lora_group.lora_forward``'s).
    """
    if stacked:
        out = torch.empty((x.shape[0], layout.rows[-1][1]), dtype=x.dtype, device=x.device)
        ys = [out.narrow(1, start, stop - start) for start, stop in layout.rows]
        for y, w, slot in zip(ys, weights, slots):
            if slot.bias is None:
                torch.mm(x, w.t(), out=y)
            else:
                torch.addmm(slot.bias.to(x.dtype), x, w.t(), out=y)
        return out, lora_forward(x, slots, layout, ys)
    ys = [
        torch.mm(x, w.t()) if s.bias is None else torch.addmm(s.bias.to(x.dtype), x, w.t())
        for w, s in zip(weights, slots)
    ]
    return ys, lora_forward(x, slots, layout, ys)


def direct_backward(
    dys: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    slots: Sequence[Slot],
    layout: Layout,
    saved: Sequence[torch.Tensor],
    needs: Sequence[Needs],
) -> tuple[torch.Tensor | None, dict]:
    """``dx = sum_i dy_i W_i + D(g A)`` (None when ``x`` wants none) and the adapters' grads.

    Args:
        dys: ``[M, out_i]`` each (column views of a stacked gradient are fine).
        x: ``[M, in]`` the saved input.
        saved: what :func:`direct_forward` returned.
    """
    dx = direct_input_backward(dys, weights) if needs[0].x else None
    return dx, lora_backward(dys, x, slots, layout, saved, dx, needs)


def direct_input_backward(
    dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The base part of the input gradient, ``dx = sum_i dy_i W_i`` (adapters not included).

    Args:
        dys: ``[M, out_i]`` each.
        weights: ``[out_i, in]`` each, as stored.
    """
    dx = torch.mm(dys[0], weights[0])
    for dy, w in zip(dys[1:], weights[1:]):
        dx.addmm_(dy, w)
    return dx
