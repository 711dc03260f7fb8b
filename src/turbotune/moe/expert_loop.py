"""Expert products as one cuBLAS ``mm`` per expert over slices of the sorted rows.

Design note. When a layer has few experts and each gets many rows (Mixtral-8x7B at 8192 tokens:
8 experts, ~2048 of the 16384 sorted rows each), every expert product is a large dense GEMM
(``[2048, 4096] x [4096, 28672]`` for gate/up) that cuBLAS runs close to peak, in the three
layouts of ``nn.Linear`` (forward ``A W^T``, input gradient ``G W``, weight gradient ``G^T A``),
the ones cuBLAS is tuned best for. Expert ``e`` owns the contiguous sorted rows
``[start_e, end_e)``, so its operands are slices of one buffer (no per-expert gather) and its
output is written with ``out=`` into its slice of one preallocated buffer (nothing concatenated);
a weight gradient goes straight into its expert's ``[N, K]`` slice of one ``[E, N, K]`` tensor, and
only experts without rows are zero-filled.

The loop needs the row counts on the host: one non-blocking copy per layer
(:meth:`~turbotune.moe.plan.ExpertPlan.on_host`), waited for when the first product is
launched (after the gather of its input), reused by every product of the layer and by its
backward (a plan without ``sizes`` reads them itself, one sync per call: the ``loop``
reference backend). Nothing here can be captured in a CUDA graph (the sizes are data).

Where it loses: many experts with few rows each (Qwen3-30B-A3B at 8192 tokens: 128 experts of
~512 rows, 768 ``mm`` calls per layer forward+backward, each a few microseconds of GPU work behind
~20-40 us of host work): one ``torch._grouped_mm`` launch per product is faster there.

Measured against the ways to hide the last partial wave of each expert's GEMM (H100, Mixtral
shape, ``benchmarks/results/h100_202611_moe_layer_s4.md``): alternating consecutive experts over
a side CUDA stream (28.74 vs 28.06 ms) and running the narrow products as one
``torch._grouped_mm`` (28.35 ms) were both slower than this plain loop, and were removed.
"""

from __future__ import annotations

import torch

from turbotune.moe.plan import ExpertPlan


def expert_bounds(plan: ExpertPlan) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every expert with rows, from ``plan.sizes`` (one device sync
    when the plan has no host sizes)."""
    sizes = plan.sizes
    if sizes is None:
        sizes = plan.counts.tolist()
    bounds, start = [], 0
    for expert, rows in enumerate(sizes):
        if rows:
            bounds.append((expert, start, start + rows))
        start += rows
    return bounds


def mm_rows(a: torch.Tensor, w_t: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``out[s] = a[s] @ w_t[e(s)]`` over the sorted rows, one ``mm`` per expert.

    Args:
        a: ``[S, K]`` sorted rows.
        w_t: ``[E, K, N]`` (any strides; the forward passes ``W.transpose(1, 2)``, the input
            gradient ``W`` itself).
        plan: the sort plan (``sizes`` read once when missing).

    Returns:
        ``[S, N]`` tensor of ``a.dtype``.
    """
    out = a.new_empty(a.shape[0], w_t.shape[2])
    bounds = expert_bounds(plan)
    for e, start, end in bounds:
        torch.mm(a[start:end], w_t[e], out=out[start:end])
    return out


def mm_wgrad(g: torch.Tensor, a: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``dW[e] = g_e^T a_e``, one ``mm`` per expert into its slice of the result.

    Args:
        g: ``[S, N]`` sorted output gradient.
        a: ``[S, K]`` sorted input rows.
        plan: the sort plan.

    Returns:
        ``[E, N, K]`` tensor of ``a.dtype`` (zero for experts without rows).
    """
    dw = a.new_empty(plan.num_experts, g.shape[1], a.shape[1])
    bounds = expert_bounds(plan)
    if len(bounds) < plan.num_experts:
        filled = {e for e, _, _ in bounds}
        for e in range(plan.num_experts):
            if e not in filled:
                dw[e].zero_()
    for e, start, end in bounds:
        torch.mm(g[start:end].t(), a[start:end], out=dw[e])
    return dw
