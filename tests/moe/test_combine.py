"""The combine kernels (Triton through the interpreter) against the eager form: the weighted
sum of each token's k rows read through ``row_of_slot`` (sorted rows) or in slot order, its
gradients (rows, routing weights), and the unweighted ``sum_rows``."""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import needs_interpreter

from turbotune.moe.combine import combine_rows, combine_rows_reference, sum_rows
from turbotune.moe.plan import plan_experts


def _diff(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    d = (got.float() - want.float()).abs()
    assert d.max() <= atol, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"


def _case(tokens: int, k: int, hidden: int, sorted_rows: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, 10, generator=gen).topk(k, dim=-1).indices
    row_of_slot = plan_experts(index, 10).row_of_slot if sorted_rows else None
    rows = torch.randn(tokens * k, hidden, generator=gen)
    weights = torch.rand(tokens, k, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen)
    return rows, row_of_slot, weights, grad


@needs_interpreter
@pytest.mark.parametrize("sorted_rows", [True, False], ids=["sorted", "slots"])
@pytest.mark.parametrize(("tokens", "k", "hidden"), [(7, 3, 45), (3, 1, 16), (2, 8, 1100)])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_combine_rows_matches_eager(tokens, k, hidden, sorted_rows, w_dtype) -> None:
    rows, row_of_slot, weights, grad = _case(tokens, k, hidden, sorted_rows, seed=tokens)
    weights = weights.to(w_dtype)
    results = []
    for fn in (combine_rows, combine_rows_reference):
        r, w = rows.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(r, row_of_slot, w, torch.float32)
        out.backward(grad)
        results.append((out.detach(), r.grad, w.grad))
    (out, d_rows, d_w), (ref, ref_rows, ref_w) = results
    assert d_w.dtype == w_dtype
    _diff("out", out, ref, 1e-5)
    _diff("grad rows", d_rows, ref_rows, 1e-6)  # w * g: one product, as eager
    _diff("grad weights", d_w, ref_w, 1e-4 if w_dtype == torch.float32 else 2e-2)
    assert ref_w.abs().max() > 0 and ref_rows.abs().max() > 0


def _within_one_bf16_ulp(name: str, got: torch.Tensor, exact: torch.Tensor) -> None:
    err = (got.detach().float() - exact).abs()
    bound = exact.abs() * 2.0**-7 + 1e-6
    assert (err <= bound).all(), f"{name}: max abs diff {err.max():.3e} mean {err.mean():.3e}"


@needs_interpreter
def test_combine_rows_frozen_weights_and_bf16_rows() -> None:
    """No routing-weight gradient wanted (the kernel skips the dot); bf16 rows and output.

    Kernel and eager both compute in fp32 and round once, so each is within one bf16 ulp of
    the exact fp32 result (half an ulp with round-to-nearest; the Triton interpreter's bf16
    store truncates): both are compared with the exact result rather than with each other.
    """
    rows, row_of_slot, weights, grad = _case(5, 2, 33, True, seed=3)
    rows, grad = rows.bfloat16(), grad.bfloat16()
    exact_rows = rows.float().requires_grad_()
    exact = combine_rows_reference(exact_rows, row_of_slot, weights, torch.float32)
    exact.backward(grad.float())
    for fn in (combine_rows, combine_rows_reference):
        r = rows.clone().requires_grad_()
        out = fn(r, row_of_slot, weights, torch.bfloat16)
        out.backward(grad)
        assert out.dtype == torch.bfloat16 and r.grad.dtype == torch.bfloat16
        _within_one_bf16_ulp(f"{fn.__name__} out", out, exact.detach())
        _within_one_bf16_ulp(f"{fn.__name__} grad rows", r.grad, exact_rows.grad)


@needs_interpreter
@pytest.mark.parametrize("sorted_rows", [True, False], ids=["sorted", "slots"])
def test_sum_rows_matches_eager(sorted_rows: bool) -> None:
    rows, row_of_slot, _, _ = _case(9, 3, 70, sorted_rows, seed=5)
    slots = rows if row_of_slot is None else rows[row_of_slot]
    want = slots.view(9, 3, 70).sum(1)
    _diff("sum_rows", sum_rows(rows, row_of_slot, 3), want, 1e-5)


def test_row_of_slot_inverts_order() -> None:
    index = torch.randint(0, 5, (11, 2), generator=torch.Generator().manual_seed(0))
    plan = plan_experts(index, 5)
    assert torch.equal(plan.row_of_slot[plan.order], torch.arange(22))
