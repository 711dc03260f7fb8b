"""LoRA adapters folded into the base matmuls, so no pass over an output is spent on them.

Design note. Added after the base matmul, the rank-``r`` term of a LoRA projection is cheap in
FLOPs but not in memory traffic: ``y += s t B^T`` reads and writes all of ``y`` (for Llama-8B's
gate/up group, ``[tokens, 2 x 14336]``: 470 MB per layer at 4096 tokens), and in backward
``g = s dy B`` reads all of ``dy`` once more. Both ride inside the base matmuls instead, by
widening the contracted or the output dimension with the ``R = sum r_i`` adapter columns:

forward (K grows)::

    [x | T] [W | sB]^T = x W^T + T (sB)^T          T = x A^T, sB block-diagonal per projection

backward (N grows)::

    dy [W | sB] = [dy W | s dy B] = [dx_base | G]

so one buffer ``W_aug = [W_stacked | blockdiag(s_i B_i)]`` (``[sum out_i, in + R]``, its
``W`` part dequantized straight into the column block) serves both. What remains per layer is
one copy of ``x`` into ``[x | T]`` (which is then saved instead of ``x``: it holds both ``x``
and ``T``), ``dB_i = s_i dy_i^T t_i``, ``dA = G^T x`` and ``dx += G A``. ``dx`` is returned as
the column view of ``[dx | G]``, a strided gradient (RMSNorm's backward and autograd accept
any row stride). ``R`` is padded to a multiple of 8 so rows stay 16-byte aligned for cuBLAS.

A lone projection whose input is much wider than its output (the MLP's down projection) gets
the backward half of the trick the other way round (K grows): ``dx = [dy | g] [W; A]`` costs a
copy of ``dy`` and saves the read-modify-write of the wide ``dx``. Its ``dA = g^T x`` is the
only part that reads ``x``: :func:`wide_input_backward` leaves it to the caller. A lone
projection that is not wide (o_proj, ``in == out``) takes the same backward at run time when its
``dy`` arrives with spare columns for ``g`` (:func:`wide_fits`): then the copy of ``dy`` is not
needed either, and ``dx = dy W; dx += g A`` (a read-modify-write of ``dx``) becomes one matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbotune.ops import spare_columns
from turbotune.ops.lora_fold_tail import write_adapter_block
from turbotune.ops.lora_group import (
    Layout,
    Needs,
    Slot,
    cast,
    placeholder,
    scaled_db,
    split_da,
    stack_cast,
)
from turbotune.ops.lora_stash import keep, take
from turbotune.quant.weights import dense_weight

__all__ = [
    "WIDE_WHEN_ROOM",
    "fold_backward",
    "fold_forward",
    "wide_backward",
    "wide_fits",
    "wide_input_backward",
]

# A lone projection that is not wide (o_proj: in == out) takes the wide backward at run time when
# the dy it receives has spare columns for g behind it (the add-norm backward leaves them): then
# [dy | g] costs no copy and the mm + addmm_ pair over dx becomes one matmul. Off: never (A/B).
WIDE_WHEN_ROOM = True


def _padded(r: int) -> int:
    return -(-r // 8) * 8


def wide_fits(layout: Layout, dy: torch.Tensor) -> bool:
    """Whether a lone shared projection can take :func:`wide_backward` for this ``dy`` with no
    copy: ``dy`` has claimable spare columns for its padded rank (nothing is claimed here).

    The forward of such a projection saves the same ``[t, A, B]`` whichever backward runs
    (``lora_group.lora_forward``), so the choice can wait until the backward.
    """
    return (
        WIDE_WHEN_ROOM
        and not layout.direct
        and layout.stackable
        and len(layout.rows) == 1
        and layout.shared
        and len(layout.adapters) == 1
        and spare_columns.has_room(dy, _padded(layout.ranks[-1][1]))
    )


def _folded_weight(
    slots: Sequence[Slot], layout: Layout, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[W_stacked | blockdiag(s_i B_i) | 0]``: ``[sum out_i, in + R_padded]`` in ``dtype``."""
    n_in, padded = layout.n_in, _padded(layout.ranks[-1][1])
    weight = torch.empty((layout.rows[-1][1], n_in + padded), dtype=dtype, device=device)
    # Column blocks first, then row slices of them: a 2-D slice costs 3x a 1-D one in Python.
    w_part, b_part = weight.narrow(1, 0, n_in), weight.narrow(1, n_in, padded)
    for slot, (start, stop) in zip(slots, layout.rows):
        dense_weight(slot.base, dtype, out=w_part[start:stop])
    write_adapter_block(b_part, slots, layout)  # one kernel for the zeros and every s_i B_i
    return weight


def fold_forward(
    x: torch.Tensor, slots: Sequence[Slot], layout: Layout, stacked: bool
) -> tuple[torch.Tensor | list[torch.Tensor], list[torch.Tensor]]:
    """``y_i = x W_i^T + b_i + s_i x A_i^T B_i^T`` of every projection, adapters folded in.

    Args:
        x: ``[M, in]`` in the compute dtype.
        stacked: one ``[M, sum out_i]`` output, else one tensor per projection.

    Returns:
        the outputs and what :func:`fold_backward` needs: ``[x_aug, A_stacked]``.
    """
    n_in = x.shape[1]
    rank = layout.ranks[-1][1]
    # The norm that produced x may have left room for T behind it (ops/spare_columns.py).
    x_aug = spare_columns.widened(x, _padded(rank))
    a_stacked = stack_cast([slots[i].A for i in layout.adapters], x.dtype)
    torch.mm(x, a_stacked.t(), out=x_aug.narrow(1, n_in, rank))
    if x_aug.shape[1] > n_in + rank:
        x_aug.narrow(1, n_in + rank, x_aug.shape[1] - n_in - rank).zero_()
    weight = _folded_weight(slots, layout, x.dtype, x.device)
    keep("folded", slots, weight)  # a checkpoint recomputation: its backward reuses it
    if stacked:
        biases = [s.bias for s in slots]
        out = torch.mm(x_aug, weight.t())
        if any(b is not None for b in biases):
            for b, (start, stop) in zip(biases, layout.rows):
                if b is not None:
                    out.narrow(1, start, stop - start).add_(cast(b, x.dtype))
        return out, [x_aug, a_stacked]
    outs = []
    for slot, (start, stop) in zip(slots, layout.rows):
        w = weight[start:stop].t()
        b = slot.bias
        outs.append(torch.mm(x_aug, w) if b is None else torch.addmm(cast(b, x.dtype), x_aug, w))
    return outs, [x_aug, a_stacked]


def fold_backward(
    dy: torch.Tensor,
    slots: Sequence[Slot],
    layout: Layout,
    saved: Sequence[torch.Tensor],
    needs: Sequence[Needs],
) -> tuple[torch.Tensor | None, dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """Input and adapter gradients from ``[dx | G] = dy W_aug`` (one matmul).

    Args:
        dy: ``[M, sum out_i]``, the output gradients side by side.
        saved: ``[x_aug, A_stacked]`` from :func:`fold_forward`.
        needs: per projection (``needs[0].x``: whether ``x`` wants a gradient).

    Returns:
        ``dx`` (a ``[M, in]`` column view, or None) and ``{index: (dA, dB)}``.
    """
    x_aug, a_stacked = saved
    n_in = a_stacked.shape[1]
    rank = layout.ranks[-1][1]
    x, t_all = x_aug.narrow(1, 0, n_in), x_aug.narrow(1, n_in, rank)
    grads = {}
    nothing = placeholder(dy.dtype, dy.device)  # beta = 0: addmm reads no input
    for k, i in enumerate(layout.adapters):
        (start, stop), (r0, r1) = layout.rows[i], layout.ranks[k]
        d_b = None
        if needs[i].B:
            d_b = torch.addmm(
                nothing,
                dy.narrow(1, start, stop - start).t(),
                t_all.narrow(1, r0, r1 - r0),
                beta=0,
                alpha=slots[i].scaling,
            )
            d_b = cast(d_b, slots[i].B.dtype)
        grads[i] = (None, d_b)
    need_x = needs[0].x
    need_a = any(needs[i].A for i in layout.adapters)
    if not (need_x or need_a):
        return None, grads
    weight = take("folded", slots, dy.dtype)  # left by a checkpoint recomputation
    if weight is None:
        weight = _folded_weight(slots, layout, dy.dtype, dy.device)
    out = torch.mm(dy, weight)
    g_all = out.narrow(1, n_in, rank)
    if need_a:
        split_da(torch.mm(g_all.t(), x), slots, layout, needs, grads)
    if not need_x:
        return None, grads
    dx = out.narrow(1, 0, n_in)
    dx.addmm_(g_all, a_stacked)
    return dx, grads


def wide_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    slot: Slot,
    saved: Sequence[torch.Tensor],
    needs: Needs,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """A lone projection with a wide input: ``dx = dy W + g A`` as ``[dy | g] [W; A]``.

    One matmul and a copy of ``dy``, instead of a second read-modify-write pass over ``dx``
    (``[M, in]``, the larger). ``x`` must want a gradient.

    Args:
        dy: ``[M, out]``.
        x: ``[M, in]`` the saved input.
        saved: ``[t, A, B]`` of the shared path (``ops.lora_group.lora_forward``).

    Returns:
        ``dx`` and ``(dA, dB)``.
    """
    dx, d_b, g = wide_input_backward(dy, slot, saved, needs.B)
    d_a = cast(torch.mm(g.t(), x), slot.A.dtype) if needs.A else None
    return dx, (d_a, d_b)


def wide_input_backward(
    dy: torch.Tensor, slot: Slot, saved: Sequence[torch.Tensor], need_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The half of :func:`wide_backward` that needs no ``x``: ``dx``, ``dB`` and ``g``.

    ``dA = g^T x`` is left to the caller, who may build ``x`` only now (the LoRA MLP writes its
    down projection's input ``h`` in the pass that consumes ``dx``).

    Args:
        dy: ``[M, out]``.
        saved: ``[t, A, B]`` of the shared path (``ops.lora_group.lora_forward``).
        need_b: whether to compute ``dB``.

    Returns:
        ``dx [M, in]``, ``dB`` (or None) and ``g = s dy B`` (``[M, r]``, a column view of the
        ``[M, out + r_padded]`` buffer ``[dy | g]``).
    """
    t, a, b = saved
    n_out, r = dy.shape[1], t.shape[1]
    rp = _padded(r)
    d_b = scaled_db(dy, t, b, slot) if need_b else None
    # The norm backward that produced dy may have left room for g behind it (spare_columns).
    dyg = spare_columns.widened(dy, rp)
    g = dyg.narrow(1, n_out, r)
    torch.addmm(g, dy, b, beta=0, alpha=slot.scaling, out=g)
    weight = torch.empty((n_out + rp, a.shape[1]), dtype=dy.dtype, device=dy.device)
    dense_weight(slot.base, dy.dtype, out=weight[:n_out])
    weight[n_out : n_out + r].copy_(a)
    if rp > r:
        dyg.narrow(1, n_out + r, rp - r).zero_()
        weight[n_out + r :].zero_()
    return torch.mm(dyg, weight), d_b, g
