"""Top-k routing as each MoE family computes it, and the load-balancing loss.

Design note. The patched models keep transformers' own router modules (their logits are what
``output_router_logits`` records and what the auxiliary loss reads), so these functions exist for
the pieces that run without a transformers router: the expert-parallel layer, the benchmark and
the tests, which check them against the routers of transformers bit for bit.

The families differ in where the softmax sits and whether the kept probabilities are renormalized:

- ``softmax_topk`` (Mixtral; Qwen2/3-MoE with ``norm_topk_prob``): softmax over all experts in
  fp32, top-k, optionally divided by their sum;
- ``topk_softmax`` (Granite-MoE): top-k of the fp32 logits, softmax over the k kept.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

RoutingStyle = Literal["softmax_topk", "topk_softmax"]


class Routed(NamedTuple):
    """One routing decision.

    Attributes:
        logits: ``[T, E]`` router logits (in the input dtype), as transformers records them.
        weights: ``[T, k]`` weights of the chosen experts.
        index: ``[T, k]`` int64 expert ids.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor


def route(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    style: RoutingStyle = "softmax_topk",
    normalize: bool = True,
    weights_dtype: torch.dtype | None = None,
) -> Routed:
    """Router logits and the top-k choice of each token.

    Args:
        hidden: ``[T, H]`` tokens.
        router_weight: ``[E, H]`` router (gate) weight.
        top_k: experts per token.
        style: where the softmax sits (see the module note).
        normalize: renormalize the kept probabilities (``softmax_topk`` only): Mixtral always,
            Qwen-MoE when ``norm_topk_prob``.
        weights_dtype: dtype of the returned weights; None keeps fp32 (Mixtral keeps fp32, Qwen
            casts to the logits' dtype, Granite to the input's).

    Returns:
        :class:`Routed` with ``[T, E]`` logits and ``[T, k]`` weights and indices.
    """
    logits = F.linear(hidden, router_weight)
    if style == "topk_softmax":
        top_logits, index = logits.float().topk(top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return Routed(logits, weights, index)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over the layers' router logits, as transformers'
    ``load_balancing_loss_func`` computes it (fraction of assignments per expert times mean
    router probability per expert, summed, times ``E``; padding excluded by ``attention_mask``).

    Args:
        router_logits: one ``[T, E]`` tensor per layer (``T = batch * sequence``).
        num_experts: ``E``.
        top_k: experts per token.
        attention_mask: optional ``[batch, sequence]`` mask (1 = real token).

    Returns:
        0-d fp32 loss.
    """
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows: torch.Tensor | float = 0.0
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.to(device), dim=-1).float()
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        row_weight = torch.ones_like(probs[:, 0]) if mask is None else mask
        assigned = assigned.scatter_add(0, chosen, row_weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * row_weight.unsqueeze(-1)).sum(dim=0)
        rows = rows + row_weight.sum()
    return (assigned / rows * prob_sum / rows).sum() * num_experts
