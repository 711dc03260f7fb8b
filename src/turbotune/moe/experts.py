"""A routed expert MLP as grouped expert products: the functional entry.

Design note. transformers 5 stores a family's experts as two stacked parameters,
``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows) and ``down_proj [E, H, I]``, and
calls ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. The same computation
here is: sort the ``T * k`` slots by expert (one ``sort``), one grouped product for gate/up that
gathers the tokens itself, the fused gated activation (:mod:`turbotune.ops.swiglu`), one grouped
product for down that keeps the sorted order, then ``sum_j w[t, j] * y[row(t, j)]`` in fp32 read
straight from the sorted rows (:mod:`turbotune.moe.combine`; deterministic, unlike
``index_add_``). Gradients reach the inputs, both weight stacks and the routing weights (hence
the router) through autograd. The grouped products are one launch each (``grouped_mm``,
``triton``), or, for few experts with many rows each, one cuBLAS ``mm`` per expert over slices of
the sorted rows (``mm_loop``, :mod:`turbotune.moe.expert_loop`); :func:`resolve_backend` says
which ``auto`` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from turbotune.moe.combine import combine_rows
from turbotune.moe.expert_gemm import Backend, expert_gemm
from turbotune.moe.plan import ExpertPlan, plan_experts
from turbotune.ops._triton import use_triton

BackendChoice = Literal["auto", "triton", "grouped_mm", "mm_loop", "loop"]

MM_LOOP_MAX_EXPERTS = 16
"""Most experts ``auto`` runs as a per-expert ``mm`` loop: 6 ``mm`` calls per expert per layer
forward+backward (~100 at 16, a few ms of host time against far more GPU time)."""
MM_LOOP_MIN_ROWS = 1024
"""Fewest sorted rows per expert (on average) ``auto`` runs as a per-expert ``mm`` loop: each
product then spans at least 8 row tiles of 128, a GEMM that fills the GPU on its own."""


class ExpertLoRA(NamedTuple):
    """One LoRA pair per expert of a stack ``W [E, N, K]``: ``W + scale * lhs @ rhs``.

    Attributes:
        lhs: ``[E, N, r]`` (peft's B per expert).
        rhs: ``[E, r, K]`` (peft's A per expert).
        scale: ``alpha / r`` (or the rsLoRA scale).
    """

    lhs: torch.Tensor
    rhs: torch.Tensor
    scale: float


def resolve_backend(
    backend: BackendChoice, hidden: torch.Tensor, num_experts: int = 0, top_k: int = 1
) -> Backend:
    """The expert kernels for ``hidden`` (``[T, H]``) routed ``top_k`` ways over ``num_experts``.

    ``auto`` on CUDA: ``mm_loop`` for few experts with many rows each (at most
    :data:`MM_LOOP_MAX_EXPERTS` experts, at least :data:`MM_LOOP_MIN_ROWS` rows per expert on
    average, i.e. ``T * k / E``; Mixtral-8x7B from 4096 tokens on): each expert's products are
    large cuBLAS GEMMs and the loop costs a few dozen host calls; not while a CUDA graph is
    being captured (the loop reads row counts on the host). Else ``grouped_mm`` for bf16 on sm90+
    where ``torch._grouped_mm`` exists (CUTLASS, one launch per product: many small experts,
    Qwen3-30B-A3B), the Triton kernels for other CUDA dtypes (and on CPU under
    ``TRITON_INTERPRET=1``); on CPU the loop.
    """
    if backend == "triton" and not use_triton(hidden):
        raise ValueError("the triton MoE backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"torch {torch.__version__} has no torch._grouped_mm")
    capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
    if backend in ("mm_loop", "loop") and capturing:
        raise ValueError(f"the {backend} MoE backend reads row counts on the host: no CUDA graphs")
    if backend != "auto":
        return backend
    if hidden.is_cuda and not capturing and prefers_mm_loop(hidden.shape[0] * top_k, num_experts):
        return "mm_loop"
    if hidden.is_cuda and hidden.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        major, _ = torch.cuda.get_device_capability(hidden.device)
        if major >= 9:
            return "grouped_mm"
    return "triton" if use_triton(hidden) and hidden.is_cuda else "loop"


def prefers_mm_loop(num_slots: int, num_experts: int) -> bool:
    """Whether ``num_slots`` sorted rows over ``num_experts`` experts are few experts with many
    rows each (see :data:`MM_LOOP_MAX_EXPERTS`, :data:`MM_LOOP_MIN_ROWS`)."""
    return 0 < num_experts <= MM_LOOP_MAX_EXPERTS and num_slots >= MM_LOOP_MIN_ROWS * num_experts


class _GatedSiLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``[S, 2I]`` rows whose backward writes ``[d_gate | d_up]`` over the
    saved rows and returns them: no ``[S, 2I]`` gradient buffer and no concatenation of the two
    halves (what autograd's ``chunk`` backward would do). The rows are the up-projection's
    output, which nothing else keeps, so overwriting them in backward is safe (a second backward
    through the same graph is not supported)."""

    @staticmethod
    def forward(ctx, gate_up):
        from turbotune.ops.swiglu import swiglu_forward

        ctx.save_for_backward(gate_up)
        return swiglu_forward(*gate_up.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, grad_h):
        from turbotune.ops.swiglu import swiglu_backward

        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d_gate, d_up = swiglu_backward(grad_h.contiguous(), gate, up, inplace=True)
        if d_gate.data_ptr() == gate.data_ptr() and d_up.data_ptr() == up.data_ptr():
            return gate_up
        return torch.cat([d_gate, d_up], dim=-1)  # the kernel could not write in place


def gated_activation(gate_up: torch.Tensor, activation: str | Callable[..., Any]) -> torch.Tensor:
    """``act(gate) * up`` of ``[S, 2I]`` rows (gate in the first half, as transformers stores it)."""
    if activation == "silu" and use_triton(gate_up):
        return _GatedSiLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        from turbotune.ops.swiglu import swiglu

        return swiglu(gate, up)  # eager where Triton does not run
    return activation(gate) * up


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Any,
    down: Any,
    *,
    activation: str | Callable[..., Any] = "silu",
    backend: BackendChoice = "auto",
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """The experts of one MoE layer on routed tokens.

    Args:
        hidden: ``[T, H]`` tokens.
        top_k_index: ``[T, k]`` expert ids.
        top_k_weights: ``[T, k]`` routing weights (any float dtype; they get gradients).
        gate_up: ``[E, 2I, H]`` stacked gate/up weights, or a quantized stack.
        down: ``[E, H, I]`` stacked down weights, or a quantized stack.
        activation: ``"silu"`` (fused SwiGLU) or a callable applied to the gate.
        backend: see :func:`resolve_backend`.
        gate_up_lora, down_lora: per-expert LoRA of the stacks, computed as two grouped rank-r
            products beside the frozen base product (the merged stack never exists).

    Returns:
        ``[T, H]`` tensor of ``hidden.dtype``.
    """
    num_experts = gate_up.shape[0] if isinstance(gate_up, torch.Tensor) else len_experts(gate_up)
    # Compute in the stacks' dtype, as transformers does (an fp32 input under autocast would
    # otherwise upcast whole bf16 / dequantized stacks).
    x = hidden.to(getattr(gate_up, "dtype", hidden.dtype))
    chosen = resolve_backend(backend, x, num_experts, top_k_index.shape[-1])
    plan = plan_experts(top_k_index, num_experts)
    if chosen == "mm_loop":
        plan = plan.on_host()  # the layer's one sync: every product reuses these counts
    gate_up_rows = expert_gemm(x, gate_up, plan, layout="gather", backend=chosen)
    if gate_up_lora is not None:
        gate_up_rows = gate_up_rows + _lora(x, gate_up_lora, plan, "gather", chosen)
    h = gated_activation(gate_up_rows, activation)
    rows = expert_gemm(h, down, plan, layout="sorted", backend=chosen)
    if down_lora is not None:
        rows = rows + _lora(h, down_lora, plan, "sorted", chosen)
    return combine_rows(rows, plan.row_of_slot, top_k_weights, hidden.dtype)


def _lora(a: torch.Tensor, lora: ExpertLoRA, plan: ExpertPlan, layout: str, backend: str):
    """``scale * (a_e @ rhs_e^T) @ lhs_e^T`` per expert: down to rank r on the input's layout,
    back up on the output's (``gather``: tokens in, sorted out; ``sorted``: sorted in and out)."""
    first = "gather" if layout == "gather" else "sorted"
    rank_bytes = lora.rhs.shape[1] * a.element_size()
    if backend == "grouped_mm" and a.is_cuda and rank_bytes % 16:
        backend = "triton"  # cuBLAS/CUTLASS grouped GEMMs want 16-byte strides (rank % 8 in bf16)
    # peft's factors are permuted views; the grouped products want row-major stacks (small).
    rhs, lhs = lora.rhs.to(a.dtype).contiguous(), lora.lhs.to(a.dtype).contiguous()
    low = expert_gemm(a, rhs, plan, layout=first, backend=backend) * lora.scale
    return expert_gemm(low, lhs, plan, layout="sorted", backend=backend)


def len_experts(stack: Any) -> int:
    """Number of experts of a quantized stack (its ``shape[0]``)."""
    return int(stack.shape[0])
