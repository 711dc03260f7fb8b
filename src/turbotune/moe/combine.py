"""Combining each token's k expert outputs with its routing weights, straight from sorted rows.

Design note. The down projection leaves one row per slot in *expert-sorted* order (``y[r]``,
``r = row_of_slot[t * k + j]``). The layer's output is

    forward   out[t, :] = sum_j w[t, j] * y[row(t, j), :]                 (fp32 sum, cast once)
    backward  dy[row(t, j), :] = w[t, j] * dout[t, :]
              dw[t, j] = sum_h dout[t, h] * y[row(t, j), h]                (fp32)

The eager form (un-permute ``y`` to slot order, upcast ``[T, k, H]`` to fp32, multiply, sum) moves
the ``[T * k, H]`` tensor through memory five times in forward and about eight times in backward
(fp32 copies saved for the weight gradient included): at the Qwen3-30B-A3B shape (k = 8) that is
more time than the layer's matrix products leave for everything else. The Triton kernels read
each row once per pass through ``row_of_slot`` and keep the sum, the products and the dot in
registers: forward reads ``y`` and writes ``[T, H]``; backward reads ``dout`` and ``y`` and writes
``dy`` already sorted, which is what the down projection's backward wants. ``sum_rows`` is the
same forward with unit weights: the gather product's input gradient (each token's k rows summed).
Where Triton does not run, the eager form is used (identical numbers: fp32 sum, one cast).
"""

from __future__ import annotations

import torch

from turbotune.ops._triton import HAS_TRITON, tl, triton, use_triton


def _block_h(hidden: int, top_k: int) -> int:
    """Columns per tile: a ``[K_PAD, BLOCK_H]`` tile of at most 4096 elements (32 fp32 values
    per thread of 4 warps, per tile held: no register spills)."""
    return min(triton.next_power_of_2(hidden), max(128, 4096 // _k_pad(top_k)), 1024)


def _k_pad(top_k: int) -> int:
    return max(2, triton.next_power_of_2(top_k))  # k = 1 (expert parallelism): no 1-wide tiles


if HAS_TRITON:

    @triton.jit
    def _token_rows(t, row_ptr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_ROW: tl.constexpr):
        """Token ``t``'s slots ``t * k + j``, the rows of ``y`` that hold them, and the mask of
        real ``j < k`` among the ``K_PAD`` lanes."""
        js = tl.arange(0, K_PAD)
        j_mask = js < TOP_K
        slots = t * TOP_K + js
        if HAS_ROW:
            rows = tl.load(row_ptr + slots, mask=j_mask, other=0).to(tl.int64)
        else:
            rows = slots
        return slots, rows, j_mask

    @triton.jit
    def _combine_fwd_kernel(
        y_ptr, row_ptr, w_ptr, out_ptr, H, stride_y, stride_out,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_ROW: tl.constexpr, HAS_W: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """``out[t, cols] = sum_j w[t, j] * y[row(t, j), cols]`` for one token and column block."""
        t = tl.program_id(0).to(tl.int64)
        slots, rows, j_mask = _token_rows(t, row_ptr, TOP_K, K_PAD, HAS_ROW)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        c_mask = cols < H
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :],
                    mask=j_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        if HAS_W:
            w = tl.load(w_ptr + slots, mask=j_mask, other=0.0).to(tl.float32)
            y = y * w[:, None]
        out = tl.sum(y, axis=0)
        tl.store(out_ptr + t * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _combine_bwd_kernel(
        g_ptr, y_ptr, row_ptr, w_ptr, dy_ptr, dw_ptr, H, stride_g, stride_y, stride_dy,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_ROW: tl.constexpr, NEED_W: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """``dy[row(t, j)] = w[t, j] * g[t]`` and ``dw[t, j] = <g[t], y[row(t, j)]>`` of one token."""
        t = tl.program_id(0).to(tl.int64)
        slots, rows, j_mask = _token_rows(t, row_ptr, TOP_K, K_PAD, HAS_ROW)
        w = tl.load(w_ptr + slots, mask=j_mask, other=0.0).to(tl.float32)
        acc = tl.zeros((K_PAD,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            c_mask = cols < H
            mask = j_mask[:, None] & c_mask[None, :]
            g = tl.load(g_ptr + t * stride_g + cols, mask=c_mask, other=0.0).to(tl.float32)
            dy = w[:, None] * g[None, :]
            tl.store(dy_ptr + rows[:, None] * stride_dy + cols[None, :],
                     dy.to(dy_ptr.dtype.element_ty), mask=mask)  # fmt: skip
            if NEED_W:
                y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)  # fmt: skip
                acc += tl.sum(y * g[None, :], axis=1)
        if NEED_W:
            tl.store(dw_ptr + slots, acc, mask=j_mask)


def _combine_launch(rows, row_of_slot, weights, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    num_tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=rows.device)
    if out.numel() == 0:
        return out
    block = _block_h(hidden, top_k)
    grid = (num_tokens, triton.cdiv(hidden, block))
    _combine_fwd_kernel[grid](
        rows, rows if row_of_slot is None else row_of_slot,
        rows if weights is None else weights, out, hidden, rows.stride(0), out.stride(0),
        TOP_K=top_k, K_PAD=_k_pad(top_k), HAS_ROW=row_of_slot is not None,
        HAS_W=weights is not None, BLOCK_H=block,
    )  # fmt: skip
    return out


class _CombineRows(torch.autograd.Function):
    """Autograd of :func:`combine_rows` on the Triton kernels (no maths here)."""

    @staticmethod
    def forward(ctx, rows, row_of_slot, weights, dtype):
        ctx.save_for_backward(rows, row_of_slot, weights)
        return _combine_launch(rows, row_of_slot, weights, weights.shape[1], dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, row_of_slot, weights = ctx.saved_tensors
        need_w = ctx.needs_input_grad[2]
        grad = grad.contiguous()
        top_k = weights.shape[1]
        num_tokens, hidden = grad.shape
        d_rows = torch.empty_like(rows)
        d_w = torch.empty(num_tokens * top_k, dtype=torch.float32, device=rows.device)
        if grad.numel():
            _combine_bwd_kernel[(num_tokens,)](
                grad, rows, rows if row_of_slot is None else row_of_slot, weights, d_rows, d_w,
                hidden, grad.stride(0), rows.stride(0), d_rows.stride(0),
                TOP_K=top_k, K_PAD=_k_pad(top_k),
                HAS_ROW=row_of_slot is not None, NEED_W=need_w, BLOCK_H=_block_h(hidden, top_k),
            )  # fmt: skip
        d_weights = d_w.view(num_tokens, top_k).to(weights.dtype) if need_w else None
        return d_rows, None, d_weights, None


def combine_rows_reference(
    rows: torch.Tensor,
    row_of_slot: torch.Tensor | None,
    weights: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The eager :func:`combine_rows`: rows to slot order, fp32 weighted sum, one cast."""
    num_tokens, top_k = weights.shape
    slots = rows if row_of_slot is None else rows.index_select(0, row_of_slot)
    weighted = slots.view(num_tokens, top_k, -1).float() * weights.float().unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


def combine_rows(
    rows: torch.Tensor,
    row_of_slot: torch.Tensor | None,
    weights: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * rows[row_of_slot[t * k + j]]`` (fp32 sum), differentiable
    in ``rows`` and ``weights``.

    Args:
        rows: ``[T * k, H]`` one row per slot (contiguous rows), in any order.
        row_of_slot: ``[T * k]`` int64 row of each slot (``ExpertPlan.row_of_slot`` for
            expert-sorted rows), or None when ``rows`` is in slot order.
        weights: ``[T, k]`` routing weights (any float dtype; their gradient has it too).
        dtype: dtype of the output.

    Returns:
        ``[T, H]`` tensor of ``dtype``.
    """
    if use_triton(rows):
        return _CombineRows.apply(rows.contiguous(), row_of_slot, weights.contiguous(), dtype)
    return combine_rows_reference(rows, row_of_slot, weights, dtype)


def sum_rows(rows: torch.Tensor, row_of_slot: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """``out[t] = sum_j rows[row_of_slot[t * k + j]]`` in fp32, cast to ``rows.dtype`` (no
    autograd: the gather product's input gradient).

    Args:
        rows: ``[T * k, H]``; row_of_slot: as :func:`combine_rows`; top_k: ``k``.

    Returns:
        ``[T, H]`` tensor of ``rows.dtype``.
    """
    if use_triton(rows):
        return _combine_launch(rows.contiguous(), row_of_slot, None, top_k, rows.dtype)
    slots = rows if row_of_slot is None else rows.index_select(0, row_of_slot)
    return slots.view(-1, top_k, rows.shape[1]).sum(dim=1)  # low precision: fp32 accumulation
