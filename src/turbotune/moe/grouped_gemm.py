"""Grouped expert GEMMs in Triton that gather their input rows and scatter their output rows.

Design note (the idea of ScatterMoE, Tan et al. 2024, arXiv:2403.08245; our own kernels). After
the slots are sorted by expert (:mod:`turbotune.moe.plan`), every expert product is a GEMM over
a contiguous run of sorted rows. Instead of materializing the gathered input ``x[token(s)]`` and
then un-permuting the output, the kernels read the input rows through an index and write the
output rows through an index:

    forward   C[c(s), n] = sum_k A[a(s), k] * W[e(s), n, k]
    weight    dW[e, n, k] = sum_{s of e} dC[c(s), n] * A[a(s), k]
    input     dA[a(s), k] = sum_n dC[c(s), n] * W[e(s), n, k]      (the forward kernel, W^T)

with ``a(s) = order[s] // FOLD`` (token of a slot when gathering, FOLD = top-k) or ``s``, and
``c(s) = order[s]`` (slot order) or ``s``. A program owns BLOCK_M sorted rows of one expert: a
*block table* (built on the device, no sync) lists each block's expert and first row; an expert
with ``n`` rows gets ``ceil(n / BLOCK_M)`` blocks and the unused tail of the table exits at once.
Accumulation is fp32; fp32 inputs use IEEE products (no TF32) so tests can compare tightly.
"""

from __future__ import annotations

import torch

from turbotune.moe.plan import ExpertPlan
from turbotune.ops._triton import HAS_TRITON, interpreting, tl, triton

_GPU_BLOCK_M = 64


def block_m() -> int:
    """Rows per program (fixed, because the block table depends on it)."""
    return 16 if interpreting() else _GPU_BLOCK_M


def _configs(names: tuple[str, str]) -> list:
    if interpreting():
        return [triton.Config({names[0]: 16, names[1]: 16}, num_warps=4)]
    shapes = [(128, 64, 4, 8), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 3, 4), (256, 64, 3, 8)]
    return [
        triton.Config({names[0]: a, names[1]: b}, num_stages=s, num_warps=w)
        for a, b, s, w in shapes
    ]


if HAS_TRITON:

    @triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_K")), key=["N", "K", "A_GATHER"])
    @triton.jit
    def _gmm_kernel(
        a_ptr, w_ptr, c_ptr, a_idx_ptr, c_idx_ptr, blk_expert_ptr, blk_row_ptr, ends_ptr,
        N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
        FOLD: tl.constexpr, A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``C[c(s), n] = sum_k A[a(s), k] W[e, n, k]`` for the BLOCK_M rows of one table entry."""
        expert = tl.load(blk_expert_ptr + tl.program_id(0))
        if expert < 0:
            return
        row0 = tl.load(blk_row_ptr + tl.program_id(0))
        end = tl.load(ends_ptr + expert)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if A_GATHER:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64) // FOLD
        else:
            a_rows = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_base = a_ptr + a_rows[:, None] * stride_am
        w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + ks < K
            a = tl.load(a_base + (k0 + ks)[None, :] * stride_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            w = tl.load(w_base + (k0 + ks)[:, None] * stride_wk,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if C_SCATTER:
            c_rows = tl.load(c_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            c_rows = rows.to(tl.int64)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_K")), key=["N", "K", "A_GATHER"])
    @triton.jit
    def _wgrad_kernel(
        g_ptr, a_ptr, dw_ptr, g_idx_ptr, a_idx_ptr, ends_ptr, counts_ptr,
        N, K, stride_gm, stride_gn, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
        FOLD: tl.constexpr, A_GATHER: tl.constexpr, G_GATHER: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``dW[e, n, k] = sum_{s of e} G[g(s), n] A[a(s), k]`` for one (e, n-tile, k-tile)."""
        expert = tl.program_id(0)
        end = tl.load(ends_ptr + expert).to(tl.int64)
        start = end - tl.load(counts_ptr + expert).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = cols < N
        k_mask = ks < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < end
            if G_GATHER:
                g_rows = tl.load(g_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            else:
                g_rows = rows
            if A_GATHER:
                a_rows = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64) // FOLD
            else:
                a_rows = rows
            g = tl.load(g_ptr + g_rows[:, None] * stride_gm + cols[None, :] * stride_gn,
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            if IEEE:
                acc += tl.dot(tl.trans(g), a, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g), a)
        dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn
                   + ks[None, :] * stride_wk)  # fmt: skip
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & k_mask[None, :])


def block_table(plan: ExpertPlan, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert, first_row)`` of every BLOCK_M-row program (expert -1: nothing to do).

    The table length ``ceil(S / bm) + E`` bounds the true block count without a device sync.
    """
    counts, ends = plan.counts, plan.ends.to(torch.int64)
    num_experts = counts.shape[0]
    blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(blocks, 0)
    index = torch.arange(triton.cdiv(plan.num_slots, bm) + num_experts, device=counts.device)
    expert = torch.searchsorted(block_end, index, right=True)
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    first_row = (ends - counts)[e] + (index - (block_end - blocks)[e]) * bm
    return torch.where(valid, e, -1).to(torch.int32), first_row.to(torch.int32)


def gmm_launch(
    a: torch.Tensor,
    weight: torch.Tensor,
    plan: ExpertPlan,
    table: tuple[torch.Tensor, torch.Tensor],
    *,
    transpose: bool,
    a_gather: bool,
    c_scatter: bool,
    gather_index: torch.Tensor | None = None,
    out_rows: int | None = None,
) -> torch.Tensor:
    """``C = A W_e^T`` (or ``A W_e`` with ``transpose``) over the sorted rows.

    Args:
        a: ``[T, K]`` tokens (``a_gather``) or ``[S, K]`` rows in the order ``gather_index``
            (sorted when it is None and not gathering).
        weight: ``[E, N, K]`` (``[E, K, N]`` with ``transpose``).
        plan, table: the sort plan and its :func:`block_table`.
        a_gather: row ``s`` reads ``a[order[s] // top_k]``.
        c_scatter: row ``s`` is written to ``out[order[s]]`` (slot order) instead of ``out[s]``.
        gather_index: with ``a_gather`` False, read row ``s`` from ``a[gather_index[s]]``.
        out_rows: rows of the output (default ``S``).

    Returns:
        ``[out_rows, N]`` tensor of ``a.dtype``.
    """
    w = weight.transpose(1, 2) if transpose else weight
    num_out, k = w.shape[1], w.shape[2]
    out = a.new_empty(out_rows or plan.num_slots, num_out)
    gather = a_gather or gather_index is not None
    idx = plan.order if a_gather else gather_index
    bm = block_m()

    def grid(meta):
        return (table[0].shape[0], triton.cdiv(num_out, meta["BLOCK_N"]))

    _gmm_kernel[grid](
        a, w, out, idx if gather else plan.order, plan.order, table[0], table[1], plan.ends,
        num_out, k, a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        FOLD=plan.top_k if a_gather else 1, A_GATHER=gather, C_SCATTER=c_scatter,
        IEEE=a.dtype == torch.float32, BLOCK_M=bm,
    )  # fmt: skip
    return out


def wgrad_launch(
    grad: torch.Tensor,
    a: torch.Tensor,
    plan: ExpertPlan,
    weight_like: torch.Tensor,
    *,
    a_gather: bool,
    g_gather: bool,
) -> torch.Tensor:
    """``dW[e] = sum_{s of e} grad[g(s)]^T a[a(s)]`` as an ``[E, N, K]`` tensor like ``weight_like``.

    Args:
        grad: ``[*, N]`` output gradient (slot order when ``g_gather``, else sorted).
        a: ``[T, K]`` tokens (``a_gather``) or ``[S, K]`` sorted rows.
    """
    dw = torch.empty_like(weight_like, memory_format=torch.contiguous_format)
    num_experts, num_out, k = dw.shape

    def grid(meta):
        return (num_experts, triton.cdiv(num_out, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    _wgrad_kernel[grid](
        grad, a, dw, plan.order, plan.order, plan.ends, plan.counts,
        num_out, k, grad.stride(0), grad.stride(1), a.stride(0), a.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        FOLD=plan.top_k if a_gather else 1, A_GATHER=a_gather, G_GATHER=g_gather,
        IEEE=a.dtype == torch.float32, BLOCK_M=block_m(),
    )  # fmt: skip
    return dw
