"""One expert projection over routed slots: ``C[s] = A[row(s)] @ W[e(s)]^T``, forward and backward.

Design note. :class:`ExpertGEMM` is the single autograd function of the expert products; the
backend only decides how the grouped products run:

- ``triton``: the gather/scatter kernels of :mod:`turbotune.moe.grouped_gemm` (no gathered copy
  of the input, no un-permute pass over the output);
- ``grouped_mm``: ``torch._grouped_mm`` (CUTLASS on sm90 in bf16) on explicitly gathered rows;
- ``mm_loop``: one cuBLAS ``mm`` per expert over slices of the sorted rows
  (:mod:`turbotune.moe.expert_loop`), the row counts read on the host once per layer
  (``ExpertPlan.sizes``); a gathered input is gathered once and kept for the weight gradient;
- ``loop``: the same per-expert products with no host counts on the plan (one sync per
  product) and the gather redone in backward: the eager reference, also the CPU fallback.

Two layouts cover an expert MLP. ``gather`` reads tokens (``[T, K]``, row ``order[s] // k``)
and writes sorted rows: the gate/up projection. ``scatter`` reads sorted rows and writes slot
order (row ``order[s]`` of ``[T * k, N]``): the down projection, so the caller combines the k
slots of a token with a reshape, not an index (``sorted``: sorted rows in and out, for the
rank-r products of expert LoRA). The weight may be a dense ``[E, N, K]`` tensor or a
quantized stack (``.dequantize(dtype)``, e.g. NF4): it is dequantized in forward and again in
backward, so a dense copy never outlives the product; a frozen or quantized weight gets no
gradient (QLoRA), and its weight-gradient product is skipped.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from turbotune.moe.combine import sum_rows
from turbotune.moe.expert_loop import mm_rows, mm_wgrad
from turbotune.moe.plan import ExpertPlan

Backend = Literal["triton", "grouped_mm", "mm_loop", "loop"]
Layout = Literal["gather", "scatter", "sorted"]


def _dense(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight if weight.dtype == dtype else weight.to(dtype)
    return weight.dequantize(dtype)


def _grouped_mm(a: torch.Tensor, w_t: torch.Tensor, plan: ExpertPlan, backend: str) -> torch.Tensor:
    """``[S, K] x [E, K, N] -> [S, N]`` over the sorted rows."""
    if backend == "grouped_mm":
        return torch._grouped_mm(a, w_t, offs=plan.ends)
    return mm_rows(a, w_t, plan)


def _grouped_wgrad(
    g: torch.Tensor, a: torch.Tensor, plan: ExpertPlan, backend: str
) -> torch.Tensor:
    """``dW[e] = g_e^T a_e``: ``[S, N], [S, K] -> [E, N, K]``."""
    if backend == "grouped_mm":
        return torch._grouped_mm(g.t(), a, offs=plan.ends)
    return mm_wgrad(g, a, plan)


def _sorted_input(a: torch.Tensor, plan: ExpertPlan, layout: Layout) -> torch.Tensor:
    return a.index_select(0, plan.tokens) if layout == "gather" else a


def _to_slots(rows: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """Sorted rows -> slot order (``out[order[s]] = rows[s]``)."""
    return torch.empty_like(rows).index_copy_(0, plan.order, rows)


class ExpertGEMM(torch.autograd.Function):
    """Autograd of one expert projection; see the module note. No maths beyond dispatch here."""

    @staticmethod
    def forward(ctx, a, weight_tensor, weight, plan, layout, backend):
        dtype = a.dtype
        w = _dense(weight, dtype)
        ctx.weight, ctx.plan, ctx.layout, ctx.backend = weight, plan, layout, backend
        ctx.dtype = dtype
        if backend == "mm_loop":  # gather once; the weight gradient reads the same sorted rows
            sorted_a = _sorted_input(a, plan, layout)
            ctx.save_for_backward(sorted_a if ctx.needs_input_grad[1] else None)
            out = _grouped_mm(sorted_a, w.transpose(1, 2), plan, backend)
            return _to_slots(out, plan) if layout == "scatter" else out
        # The input serves the weight gradient only: frozen stacks (LoRA/QLoRA) need not keep it.
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None)
        if backend == "triton":
            from turbotune.moe import grouped_gemm as k

            ctx.table = k.block_table(plan, k.block_m())
            return k.gmm_launch(
                a, w, plan, ctx.table, transpose=False,
                a_gather=layout == "gather", c_scatter=layout == "scatter",
            )  # fmt: skip
        out = _grouped_mm(_sorted_input(a, plan, layout), w.transpose(1, 2), plan, backend)
        return _to_slots(out, plan) if layout == "scatter" else out

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        plan, layout, backend = ctx.plan, ctx.layout, ctx.backend
        grad = grad.contiguous()
        need_a, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = _dense(ctx.weight, ctx.dtype) if need_a else None
        if backend == "triton":
            grad_a, grad_w = _triton_backward(ctx, grad, a, w, need_a, need_w)
        else:
            grad_a, grad_w = _torch_backward(grad, a, w, plan, layout, backend, need_a, need_w)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight.dtype)
        return grad_a, grad_w, None, None, None, None


def _triton_backward(ctx, grad, a, w, need_a: bool, need_w: bool):
    from turbotune.moe import grouped_gemm as k

    plan, gather, scatter = ctx.plan, ctx.layout == "gather", ctx.layout == "scatter"
    grad_a = grad_w = None
    if need_a:
        grad_a = k.gmm_launch(
            grad, w, plan, ctx.table, transpose=True, a_gather=False, c_scatter=gather,
            gather_index=plan.order if scatter else None,
        )  # fmt: skip
        if gather:  # slot rows -> sum over each token's k slots
            grad_a = grad_a.view(-1, plan.top_k, grad_a.shape[1]).sum(1)
    if need_w:
        grad_w = k.wgrad_launch(grad, a, plan, ctx.weight, a_gather=gather, g_gather=scatter)
    return grad_a, grad_w


def _torch_backward(grad, a, w, plan, layout, backend, need_a: bool, need_w: bool):
    sorted_grad = grad.index_select(0, plan.order) if layout == "scatter" else grad
    grad_a = grad_w = None
    if need_a:
        grad_a = _grouped_mm(sorted_grad, w, plan, backend)
        if layout == "gather":  # each token's k sorted rows summed (fp32), no slot-order copy
            grad_a = sum_rows(grad_a, plan.row_of_slot, plan.top_k)
    if need_w:  # mm_loop saved the sorted input already
        rows = a if backend == "mm_loop" else _sorted_input(a, plan, layout)
        grad_w = _grouped_wgrad(sorted_grad, rows, plan, backend)
    return grad_a, grad_w


def expert_gemm(
    a: torch.Tensor, weight: Any, plan: ExpertPlan, *, layout: Layout, backend: Backend
) -> torch.Tensor:
    """One expert projection (see the module note).

    Args:
        a: ``[T, K]`` tokens (``gather``) or ``[S, K]`` sorted rows (``scatter``, ``sorted``).
        weight: ``[E, N, K]`` tensor (transformers' ``[experts, out, in]`` layout) or a quantized
            stack with ``.dequantize(dtype)``.
        plan: :func:`~turbotune.moe.plan.plan_experts` of the routing.
        layout: ``gather`` (sorted ``[S, N]`` out), ``scatter`` (slot-order ``[T * k, N]`` out) or
            ``sorted`` (sorted in, sorted out).
        backend: ``triton``, ``grouped_mm``, ``mm_loop`` or ``loop``.

    Returns:
        ``[S, N]`` tensor of ``a.dtype``.
    """
    weight_tensor = weight if isinstance(weight, torch.Tensor) else None
    return ExpertGEMM.apply(a, weight_tensor, weight, plan, layout, backend)
