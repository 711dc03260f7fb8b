"""route() and load_balancing_loss() against transformers' routers and loss functions."""

from __future__ import annotations

import importlib

import pytest
import torch
from tests.moe.tiny import sparse_blocks, tiny_model

from turbotune.moe import load_balancing_loss, route
from turbotune.moe.plan import plan_experts

# family -> (style, normalize from config?, weights dtype rule)
_STYLES = {
    "mixtral": ("softmax_topk", lambda c: True, None),
    "qwen2_moe": ("softmax_topk", lambda c: c.norm_topk_prob, "logits"),
    "qwen3_moe": ("softmax_topk", lambda c: c.norm_topk_prob, "logits"),
    "granitemoe": ("topk_softmax", lambda c: True, "logits"),
}


@pytest.mark.parametrize("family", sorted(_STYLES))
def test_route_matches_router(family: str) -> None:
    model = tiny_model(family)
    block = sparse_blocks(model)[0]
    router = getattr(block, "gate", None) or block.router
    x = torch.randn(13, model.config.hidden_size)
    logits, weights, index = router(x)
    style, normalize, dtype_rule = _STYLES[family]
    got = route(
        x, router.weight, index.shape[1], style=style, normalize=normalize(model.config),
        weights_dtype=logits.dtype if dtype_rule else None,
    )  # fmt: skip
    assert torch.equal(got.logits, logits)
    assert torch.equal(got.index, index), "expert choice differs"
    assert got.weights.dtype == weights.dtype
    diff = (got.weights - weights).abs().max()
    assert diff <= 1e-7, f"weights: max abs diff {diff:.3e}"


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked: bool) -> None:
    reference = importlib.import_module(
        "transformers.models.mixtral.modeling_mixtral"
    ).load_balancing_loss_func
    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 6, generator=gen) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    if masked:
        mask[0, :4] = 0
    want = reference(logits, 6, 2, mask if masked else None)
    got = load_balancing_loss(logits, 6, 2, mask if masked else None)
    assert abs(got.item() - want.item()) <= 1e-6, f"{got.item()} vs {want.item()}"


def test_plan_sorts_stably_and_counts() -> None:
    index = torch.tensor([[2, 0], [0, 2], [3, 0]])
    plan = plan_experts(index, num_experts=5)
    assert plan.order.tolist() == [1, 2, 5, 0, 3, 4]  # expert 0: slots 1, 2, 5 in token order
    assert plan.counts.tolist() == [3, 0, 2, 1, 0]
    assert plan.ends.tolist() == [3, 3, 5, 6, 6]
