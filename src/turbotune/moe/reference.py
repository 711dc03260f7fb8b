"""Eager references for the MoE ops: one matmul per expert, as transformers' ``eager`` experts.

Tests and benchmarks compare the fast paths with these; they index tokens per expert with
``torch.where`` and accumulate with ``index_add_`` exactly like the transformers loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def moe_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """``sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = top_k_index[t, j]``.

    Shapes as :func:`turbotune.moe.experts.moe_experts`; accumulates in fp32.
    """
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(activation(gate) * up, down[expert])
        out.index_add_(0, token, y.float() * top_k_weights[token, slot, None].float())
    return out.to(hidden.dtype)
