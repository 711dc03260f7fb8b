"""The LoRA MLP's forward tail: ``h = act(e) * u`` written with ``T = h A^T`` behind it, then
ONE GEMM.

Design note. After the gate/up group (``ops/lora.py``), the down projection with an adapter
used to cost three passes besides its base GEMM: the gated activation writes ``h`` (``[M, I]``),
``T = h A_down^T`` reads all of ``h`` again (48 us at Llama-8B, ``M = 4096``, ``I = 14336``,
on an H100), and ``y += s T B^T`` reads and writes all of ``y`` (26 us). Here:

1. :func:`glu_lora` writes ``h`` into an ``[M, I + R]`` buffer and ``T`` (rounded) into its
   ``R`` spare columns (zeros behind the rank) and into a separate ``[M, r]`` tensor ``t``, the
   only adapter product the backward reads (``ops/lora_mlp_backward.py``). By default
   (``FUSED_T`` off) the activation kernel writes ``h`` straight into the buffer and a cuBLAS
   ``mm`` computes ``T``: on an H100 that pair beat the one-pass kernel. The one-pass Triton
   kernel computes ``h`` exactly as ``swiglu._fwd_kernel`` does (fp32 maths, one rounding)
   and, while the block of ``h`` is still in registers, accumulates ``T = h_rounded A^T`` with
   ``tl.dot`` in fp32 (so ``T`` equals the eager ``mm`` of the rounded ``h`` up to summation
   order). Each program owns ``BLOCK_M`` rows and one of ``SPLIT`` column ranges of ``I``: no
   atomics; with a split, torch sums the fp32 partials and rounds ``T`` once.
2. :func:`down_forward`: ``y = [h | T] [W | sB | 0]^T``, the folded weight of
   ``ops/lora_fold.py`` (the ``W`` part dequantized straight into it), as one GEMM. The
   decoder layer's residual may ride on it too (``torch.addmm(residual, ...)``): torch copies
   it into the output and cuBLAS adds the product in place (one copy instead of an add that
   reads two tensors; an in-place ``residual.addmm_`` would save the copy too, but the
   add-norm before the MLP saves that very tensor for its backward). Plain dense
   bases in the compute dtype (``ops/lora_direct.py``) would pay a copy of ``W`` for the fold:
   there ``y = s t B^T`` is written first (rank ``r``) and ``y += h W^T`` uses ``W`` as stored,
   cuBLAS reading ``y`` in its epilogue (no read-modify-write pass of its own over ``y``).

What the backward finds is what the unfused path saved: ``[t, A, B]`` (``A``, ``B`` cast to
the compute dtype). ``t`` is its own small tensor: a view into ``[h | T]`` would keep the whole
buffer (117 MB per layer at 4096 tokens) alive until backward. Under activation checkpointing
the recomputed forward leaves the ``W`` part of its folded weight to the backward
(``ops/lora_stash.py``, as the stacked weight it would have built).

``ENABLED = False`` restores the separate activation, ``mm`` and ``addmm_`` (A/B measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from turbotune.ops import lora_group
from turbotune.ops._triton import tl, triton, use_triton
from turbotune.ops.lora_fold import _folded_weight, _padded
from turbotune.ops.lora_group import Layout, Slot, cast, placeholder
from turbotune.ops.lora_mlp_backward import glu_forward
from turbotune.ops.lora_stash import keep
from turbotune.ops.swiglu import _ACTIVATION_IDS, _act_and_grad, _glu_forward

__all__ = ["ENABLED", "FUSED_T", "applies", "down_forward", "glu_lora"]

Activation = Literal["silu", "gelu_tanh", "gelu"]

# Off: the MLP's down projection runs as before (activation kernel, T by mm, y.addmm_).
ENABLED = True
# Off: h by the activation kernel (written into the wide buffer) and T by a cuBLAS mm instead of
# the one kernel. On an H100 at Llama-8B shape the pair takes 0.179-0.192 ms and the one kernel
# 0.187-0.208 ms at its best setting of the sweep (benchmarks/glu_lora_forward.py), and the
# whole step is 1.1% slower with it (session 5, benchmarks/results/h100_202611_step_s5.md): the
# one-pass kernel stays off until a setting beats the pair.
FUSED_T = False
# Launch settings (benchmarks/glu_lora_forward.py sweeps them on an H100).
# (H100, first sweep: 64 x 128, 4 warps, 3 stages, split 4 was the fastest at 0.208 ms.)
BLOCK_M = 64
BLOCK_I = 128
NUM_WARPS = 4
NUM_STAGES = 3
# Programs per row block along I (1: each program loops over all of I, no partial sums).
SPLIT = 4
# Widest rank block the kernel keeps in registers; wider adapters take the eager path.
MAX_RANK = 256


@triton.jit
def _glu_lora_kernel(
    h_ptr,
    stride_hm,
    t_ptr,
    stride_tm,
    e_ptr,
    stride_em,
    u_ptr,
    stride_um,
    a_ptr,
    stride_ar,
    part_ptr,
    n_rows,
    n_cols,
    split_cols,
    rank,
    room,
    ACTIVATION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``h = act(e) * u`` and ``T = h A^T`` for ``BLOCK_M`` rows, looping over the ``I`` columns.

    ``h`` (rounded to its dtype) is both stored and fed to ``tl.dot``; ``T`` accumulates in fp32
    and is rounded once. ``T`` goes to ``t`` (``[M, rank]``) and, when ``room > 0``, to the
    ``room`` columns behind ``h``'s ``n_cols`` (zeros past ``rank``: ``A``'s masked rows are 0).
    ``DOT_FP32`` (fp32 inputs, and the interpreter, whose bf16 ``tl.dot`` returns garbage on
    Triton 3.9) feeds ``tl.dot`` the same rounded values as fp32. ``SPLIT``: program ``(i, j)``
    covers columns ``[j split_cols, (j + 1) split_cols)`` only and stores its fp32 partial ``T``
    to ``part`` (``[n_splits, M, BLOCK_R]``), for the launcher to sum and round.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # M * (I + R) passes 2^31 at long sequences
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    col_begin = tl.program_id(1) * split_cols
    col_end = tl.minimum(col_begin + split_cols, n_cols)
    for start in range(col_begin, col_end, BLOCK_I):
        cols = start + tl.arange(0, BLOCK_I)
        col_ok = cols < col_end
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(e_ptr + rows[:, None] * stride_em + cols[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
        act, _ = _act_and_grad(g.to(tl.float32), ACTIVATION)
        h = (act * u.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], h, mask=mask)
        a_mask = rank_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :], mask=a_mask, other=0.0)
        if DOT_FP32:  # no TF32, as torch.mm in fp32; bf16 products are exact in fp32
            acc = tl.dot(h.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(a), acc)
    if SPLIT:
        part = part_ptr + (tl.program_id(1) * n_rows + rows[:, None]) * BLOCK_R + ranks[None, :]
        tl.store(part, acc, mask=row_ok[:, None])
    else:
        t = acc.to(t_ptr.dtype.element_ty)
        t_mask = row_ok[:, None] & rank_ok[None, :]
        tl.store(t_ptr + rows[:, None] * stride_tm + ranks[None, :], t, mask=t_mask)
        spare = h_ptr + rows[:, None] * stride_hm + n_cols + ranks[None, :]
        tl.store(spare, t, mask=row_ok[:, None] & (ranks < room)[None, :])


def glu_lora(
    e: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    activation: Activation,
    room: int = 0,
    *,
    block_m: int | None = None,
    block_i: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: int | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = act(e) * u`` written with ``T = h A^T`` behind it, and ``t = T`` on its own.

    Args:
        e: ``[M, I]`` gate output, unit column stride (a column view of ``[e | u]`` is fine).
        u: ``[M, I]`` up output, ``e``'s dtype.
        a: ``[r, I]`` the down adapter's ``A`` in ``e``'s dtype.
        activation: the gate's activation.
        room: spare columns behind ``h`` (0, or at least ``r``): they hold ``[T | 0]``.
        block_m, block_i, num_warps, num_stages, split: launch overrides (benchmarks);
            ``split > 1`` also splits the ``I`` loop over that many programs per row block
            (fp32 partial sums of ``T``, added by torch afterwards).
        fused: the one-pass kernel (True) or the activation kernel and a ``mm`` (False);
            None: :data:`FUSED_T`.

    Returns:
        ``(wide, t)``: ``wide`` is ``[M, I + room]`` (``h`` in its first ``I`` columns), ``t``
        ``[M, r]``, both in ``e``'s dtype.
    """
    n_rows, n_cols = e.shape
    rank = a.shape[0]
    if u.shape != e.shape or a.shape[1] != n_cols or u.dtype != e.dtype or a.dtype != e.dtype:
        raise ValueError(f"e {tuple(e.shape)}, u {tuple(u.shape)}, A {tuple(a.shape)} mismatch")
    if room and room < rank:
        raise ValueError(f"room {room} cannot hold rank {rank}")
    wide = torch.empty((n_rows, n_cols + room), dtype=e.dtype, device=e.device)
    t = torch.empty((n_rows, rank), dtype=e.dtype, device=e.device)
    kernel_ok = max(rank, room) <= MAX_RANK and e.stride(1) == 1 and u.stride(1) == 1
    if not ((FUSED_T if fused is None else fused) and kernel_ok and use_triton(e, u, a)):
        return _eager(e, u, a, activation, wide, t)
    if n_rows == 0:
        return wide, t
    block_m, block_i = block_m or BLOCK_M, block_i or BLOCK_I
    block_r = max(16, triton.next_power_of_2(max(rank, room)))
    split = split or SPLIT
    split_cols = triton.cdiv(triton.cdiv(n_cols, split), block_i) * block_i if split > 1 else n_cols
    n_splits = triton.cdiv(n_cols, split_cols)
    part = wide  # unused without a split
    if n_splits > 1:
        part = torch.empty((n_splits, n_rows, block_r), dtype=torch.float32, device=e.device)
    a = a if a.stride(1) == 1 else a.contiguous()
    dot_fp32 = e.dtype == torch.float32 or not e.is_cuda  # CPU tensors: the interpreter
    _glu_lora_kernel[(triton.cdiv(n_rows, block_m), n_splits)](
        wide, wide.stride(0), t, t.stride(0), e, e.stride(0), u, u.stride(0), a, a.stride(0),
        part, n_rows, n_cols, split_cols, rank, room,
        ACTIVATION=_ACTIVATION_IDS[activation], DOT_FP32=dot_fp32, SPLIT=n_splits > 1,
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_R=block_r,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES,
    )  # fmt: skip
    if n_splits > 1:  # one rounding of the summed partials, as without the split
        total = part.sum(0)
        t.copy_(total[:, :rank])
        if room:
            wide.narrow(1, n_cols, room).copy_(total[:, :room])
    return wide, t


def _eager(
    e: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    activation: Activation,
    wide: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same outputs from the activation kernel (or its reference) and a ``mm``."""
    n_cols, rank = e.shape[1], a.shape[0]
    h = wide.narrow(1, 0, n_cols)
    if use_triton(e, u) and e.stride(1) == 1 and u.stride(1) == 1:
        _glu_forward(e, u, activation, out=h)  # the activation kernel writes into the room's rows
    else:
        h.copy_(glu_forward(e, u, activation))
    torch.mm(h, a.t(), out=t)
    room = wide.shape[1] - n_cols
    if room:
        wide.narrow(1, n_cols, rank).copy_(t)
        wide.narrow(1, n_cols + rank, room - rank).zero_()
    return wide, t


# ---- the down projection ----


def applies(down: Slot, layout: Layout) -> bool:
    """Whether :func:`down_forward` runs the down projection: an adapter without dropout, and
    either weights used as stored or a folded weight (``FOLD_ADAPTERS`` on, shape known)."""
    if not ENABLED or down.A is None or down.dropout != 0.0:
        return False
    return layout.direct or (lora_group.FOLD_ADAPTERS and layout.stackable)


def down_forward(
    e: torch.Tensor,
    u: torch.Tensor,
    down: Slot,
    layout: Layout,
    weights: Sequence[torch.Tensor] | None,
    activation: Activation,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``y = residual + (act(e) * u) W^T + b + s T B^T`` when :func:`applies`, ``h`` never a
    tensor of its own.

    Args:
        e, u: ``[M, I]`` the gate and up outputs (column views of ``[e | u]``).
        down: the down projection (adapter, no dropout).
        layout: its layout (``lora_direct.plan_group``); weights: the stored weight when
            ``layout.direct``.
        activation: the gate's activation.
        residual: optional ``[M, out]`` in ``e``'s dtype, added by the GEMM (``addmm``: torch
            copies it into the output, cuBLAS then reads it in its epilogue).

    Returns:
        ``y [M, out]`` and what the down projection's backward reads: ``[t, A, B]``.
    """
    dtype = e.dtype
    a, b = cast(down.A, dtype), cast(down.B, dtype)
    if layout.direct:  # the fold would copy W: W as stored, the adapter term written first
        h, t = glu_lora(e, u, a, activation)
        # y = s t B^T (rank r: a write of y), then y += h W^T: the big GEMM reads y in its
        # epilogue instead of a separate read-modify-write pass over y after it.
        y = _matmul(t, b.t(), residual, down.bias, alpha=down.scaling)
        y.addmm_(h, weights[0].t())
        return y, [t, a, b]
    wide, t = glu_lora(e, u, a, activation, room=_padded(a.shape[0]))
    weight = _folded_weight([down], layout, dtype, e.device)
    # A checkpoint recomputation: the backward's dh = dy W reads the W part (a column view).
    keep("stacked", [down], weight.narrow(1, 0, e.shape[1]))
    return _matmul(wide, weight.t(), residual, down.bias), [t, a, b]


def _matmul(
    x: torch.Tensor,
    w_t: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``residual + alpha x w_t + bias`` with what is there folded into the one ``addmm``."""
    bias = None if bias is None else cast(bias, x.dtype)
    if residual is not None:
        y = torch.addmm(residual, x, w_t, alpha=alpha)
        return y if bias is None else y.add_(bias)
    if bias is not None:
        return torch.addmm(bias, x, w_t, alpha=alpha)
    if alpha == 1.0:
        return torch.mm(x, w_t)
    return torch.addmm(placeholder(x.dtype, x.device), x, w_t, beta=0, alpha=alpha)
