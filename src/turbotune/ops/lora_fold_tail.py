"""The adapter columns of a folded weight, ``[blockdiag(s_i B_i) | 0]``, in one kernel.

Design note. ``ops/lora_fold.py`` builds ``W_aug = [W_stacked | blockdiag(s_i B_i) | 0]`` in
forward and again in backward for every q/k/v and gate/up group. Its adapter block
(``[sum out_i, R_padded]``, a column view of ``W_aug``) took a ``zero_()`` plus one strided
``torch.mul`` per adapter: 3-4 tiny launches (~4 us of GPU each, replayed one by one inside a
CUDA graph), ~450 per step at Llama-8B. :func:`write_adapter_block` writes the whole block,
values and zeros, in one Triton launch: each program owns a tile of rows x all block columns
and, for each adapter, selects ``s_k B_k[row - start_k, col - r0_k]`` where the tile meets
that adapter's rows and rank columns; everything else is zero (padding columns, projections
without an adapter).

Bitwise equal to the torch code it replaces, ``torch.mul(B, s, out=view)``: torch computes in
the promoted type of ``B`` and a Python float (``B.dtype``), in fp32 arithmetic with ``s``
rounded to fp32, rounds to ``B.dtype``, then casts to the output dtype. The kernel repeats
those two roundings. Rounding to bf16 is done on the fp32 bits (round to nearest even), because
Triton's interpreter truncates on ``.to(tl.bfloat16)`` where the GPU rounds.

CUDA-graph safe: one launch on the current stream, no allocation, no host sync. At most
``MAX_ADAPTERS`` adapters per group (q/k/v has 3) get pointer slots of the kernel; more, a
tensor subclass, or no Triton fall back to the eager code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbotune.ops._triton import tl, triton, use_triton
from turbotune.ops.lora_group import Layout, Slot

__all__ = ["MAX_ADAPTERS", "write_adapter_block"]

# Pointer slots of the kernel (a Triton kernel cannot index a list of pointers).
MAX_ADAPTERS = 4
# Elements per program: a tile of rows x the whole (padded) rank block.
_TILE = 4096
# Beyond this many block columns (a rank above ~4000) the eager code is good enough.
_MAX_COLS = 16384
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@triton.jit
def _round_as(v, target: tl.constexpr):
    """``v`` (fp32) rounded to the dtype ``target`` to nearest even, kept in fp32."""
    if target == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    elif target == tl.float32:
        return v
    else:
        return v.to(target).to(tl.float32)


@triton.jit
def _adapter_tile(acc, rows, cols, b_ptr, stride_br, stride_bc, start, stop, r0, r1, scaling):
    """``acc`` with ``round_B(s B[row - start, col - r0])`` where the tile meets this adapter."""
    hit = ((rows >= start) & (rows < stop))[:, None] & ((cols >= r0) & (cols < r1))[None, :]
    offs = (rows - start).to(tl.int64)[:, None] * stride_br + (cols - r0)[None, :] * stride_bc
    b = tl.load(b_ptr + offs, mask=hit, other=0.0)
    v = _round_as(b.to(tl.float32) * scaling, b_ptr.dtype.element_ty)
    return tl.where(hit, v, acc)


@triton.jit
def _adapter_block_kernel(
    out_ptr, stride_om, n_rows, n_cols,
    b0_ptr, s0_r, s0_c, start0, stop0, r0_0, r1_0, scale0,
    b1_ptr, s1_r, s1_c, start1, stop1, r0_1, r1_1, scale1,
    b2_ptr, s2_r, s2_c, start2, stop2, r0_2, r1_2, scale2,
    b3_ptr, s3_r, s3_c, start3, stop3, r0_3, r1_3, scale3,
    N_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``out[m, c] = round_out(round_Bk(s_k B_k[m - start_k, c - r0_k]))`` inside adapter
    ``k``'s rows and rank columns, else 0. ``out``: ``[n_rows, n_cols]``, row stride
    ``stride_om``, unit column stride."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _adapter_tile(acc, rows, cols, b0_ptr, s0_r, s0_c, start0, stop0, r0_0, r1_0, scale0)
    if N_ADAPTERS > 1:
        acc = _adapter_tile(acc, rows, cols, b1_ptr, s1_r, s1_c, start1, stop1, r0_1, r1_1, scale1)
    if N_ADAPTERS > 2:
        acc = _adapter_tile(acc, rows, cols, b2_ptr, s2_r, s2_c, start2, stop2, r0_2, r1_2, scale2)
    if N_ADAPTERS > 3:
        acc = _adapter_tile(acc, rows, cols, b3_ptr, s3_r, s3_c, start3, stop3, r0_3, r1_3, scale3)
    out_ty = out_ptr.dtype.element_ty
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptr + offs, _round_as(acc, out_ty).to(out_ty), mask=mask)


def _eager_adapter_block(b_part: torch.Tensor, slots: Sequence[Slot], layout: Layout) -> None:
    """The torch version: zero the block, then one cast-and-scale ``mul`` per adapter."""
    b_part.zero_()
    for k, i in enumerate(layout.adapters):
        (start, stop), (r0, r1) = layout.rows[i], layout.ranks[k]
        # the cast to the compute dtype and the scaling in one kernel
        torch.mul(slots[i].B, slots[i].scaling, out=b_part[start:stop].narrow(1, r0, r1 - r0))


def write_adapter_block(b_part: torch.Tensor, slots: Sequence[Slot], layout: Layout) -> None:
    """Write ``[blockdiag(s_i B_i) | 0]`` over all of ``b_part``.

    Args:
        b_part: ``[sum out_i, R_padded]``, any row stride, unit column stride (the adapter
            column block of ``W_aug``); every element is overwritten.
        slots: the group's projections; ``slots[i].B`` is ``[out_i, r_i]``, any float dtype
            and strides.
        layout: ``rows[i]`` are projection ``i``'s rows, ``ranks[k]`` adapter ``k``'s columns
            (adapter ``k`` is projection ``layout.adapters[k]``).
    """
    adapters = layout.adapters
    n_rows, n_cols = b_part.shape
    if (
        not 0 < len(adapters) <= MAX_ADAPTERS
        or n_cols > _MAX_COLS
        or b_part.stride(1) != 1
        or not use_triton(b_part)
        or any(type(slots[i].B) not in _PLAIN for i in adapters)
    ):
        _eager_adapter_block(b_part, slots, layout)
        return
    args: list = []
    for k, i in enumerate(adapters):
        b = slots[i].B
        (start, stop), (r0, r1) = layout.rows[i], layout.ranks[k]
        args += [b, b.stride(0), b.stride(1), start, stop, r0, r1, float(slots[i].scaling)]
    # Unused slots repeat the first (never read: N_ADAPTERS guards them).
    args += args[:8] * (MAX_ADAPTERS - len(adapters))
    block_n = triton.next_power_of_2(n_cols)
    block_m = min(max(1, _TILE // block_n), triton.next_power_of_2(n_rows))
    grid = (triton.cdiv(n_rows, block_m),)
    _adapter_block_kernel[grid](
        b_part, b_part.stride(0), n_rows, n_cols, *args,
        N_ADAPTERS=len(adapters), BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
