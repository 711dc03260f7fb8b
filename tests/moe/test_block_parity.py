"""The patched experts against transformers' own sparse MoE block, every family and backend:
outputs, router logits, and the gradients of the input, the router and both expert stacks."""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import (
    FAMILIES,
    MORE_FAMILIES,
    TRITON,
    router,
    run_block,
    sparse_blocks,
    tiny_model,
)

from turbotune.patches import apply_patches


def _compare(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        diff = (got[name].float() - ref.float()).abs()
        assert diff.max() <= atol, (
            f"{name}: max abs diff {diff.max():.3e} mean {diff.mean():.3e} (atol {atol})"
        )


def _run(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    torch.manual_seed(0)  # PhiMoE samples its experts while training: the same draws each run
    return run_block(block, x, grad)


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(MORE_FAMILIES))
@pytest.mark.parametrize("backend", ["loop", "mm_loop", "grouped_mm", TRITON])
def test_block_matches_transformers(family: str, backend: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model(family)
    block = sparse_blocks(model)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, model.config.hidden_size, generator=gen)
    grad = torch.randn(2, 11, model.config.hidden_size, generator=gen)
    want = _run(block, x, grad)
    patches = apply_patches(model, ["moe"], moe_backend=backend)
    assert patches.counts == {"moe": len(sparse_blocks(model))}
    got = _run(block, x, grad)
    _compare(got, want, atol=2e-5)
    patches.undo()
    _compare(_run(block, x, grad), want, atol=0.0)  # undo restores the original exactly


def test_top_k_weights_receive_gradient() -> None:
    """A wrong combine (weights detached) would leave the router without gradient from the
    experts: the router gradient must differ from the one of the aux-free, weight-free path."""
    model = tiny_model("mixtral")
    block = sparse_blocks(model)[0]
    apply_patches(model, ["moe"], moe_backend="loop")
    x = torch.randn(5, 3, model.config.hidden_size)
    block(x).square().sum().backward()
    assert router(block).weight.grad.abs().max() > 1e-4
