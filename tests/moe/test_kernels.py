"""The expert GEMM backends (Triton through the interpreter) against the per-expert loop at odd
shapes: empty experts, experts with more rows than a block, both layouts, every gradient."""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import TRITON, DequantizableStack, needs_interpreter, routing

from turbotune.moe.expert_gemm import expert_gemm
from turbotune.moe.experts import ExpertLoRA, moe_experts
from turbotune.moe.plan import plan_experts
from turbotune.moe.reference import moe_experts_reference


def _diff(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    d = (got - want).abs()
    assert d.max() <= atol, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"


@needs_interpreter
@pytest.mark.parametrize("layout", ["gather", "scatter", "sorted"])
@pytest.mark.parametrize(("tokens", "k_in", "n_out", "experts", "k", "skew"), [
    (37, 24, 20, 5, 2, True), (3, 16, 16, 4, 1, False), (29, 33, 17, 7, 3, True),
])  # fmt: skip
def test_expert_gemm_triton(layout, tokens, k_in, n_out, experts, k, skew) -> None:
    index = routing(tokens, experts, k, seed=tokens, skew=skew)
    plan = plan_experts(index, experts)
    rows = tokens if layout == "gather" else tokens * k  # sorted/scatter: [S, K] sorted rows
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(rows, k_in, generator=gen)
    w = torch.randn(experts, n_out, k_in, generator=gen)
    grad = torch.randn(tokens * k, n_out, generator=gen)
    results = {}
    for backend in ("loop", "triton"):
        a_, w_ = a.clone().requires_grad_(), w.clone().requires_grad_()
        out = expert_gemm(a_, w_, plan, layout=layout, backend=backend)
        out.backward(grad)
        results[backend] = (out.detach(), a_.grad, w_.grad)
    for name, got, want in zip(("out", "grad_a", "grad_w"), results["triton"], results["loop"]):
        _diff(name, got, want, 1e-4)
    if skew:
        assert plan.counts[-1] == 0 and results["loop"][2][-1].abs().max() == 0


@needs_interpreter
def test_frozen_weight_gets_no_gradient() -> None:
    """QLoRA-style frozen stacks: the weight-gradient product is skipped, inputs still get one."""
    index = routing(9, 4, 2, seed=0, skew=False)
    x = torch.randn(9, 16, requires_grad=True)
    gate_up, down = torch.randn(4, 32, 16), torch.randn(4, 16, 16)
    weights = torch.rand(9, 2)
    out = moe_experts(x, index, weights, gate_up, down, backend="triton")
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    moe_experts_reference(ref_x, index, weights, gate_up, down).sum().backward()
    _diff("grad_x", x.grad, ref_x.grad, 1e-4)


@pytest.mark.parametrize("backend", ["loop", "mm_loop", "grouped_mm", TRITON])
def test_dequantizable_stacks(backend: str) -> None:
    """Stacks behind ``.dequantize`` are dequantized in forward and again in backward only."""
    index = routing(11, 4, 2, seed=3, skew=True)
    gen = torch.Generator().manual_seed(3)  # seeded: the tolerance below is for these values
    x = torch.randn(11, 16, generator=gen).requires_grad_()
    gate_up = DequantizableStack(torch.randn(4, 32, 16, generator=gen))
    down = DequantizableStack(torch.randn(4, 16, 16, generator=gen))
    weights = torch.rand(11, 2, generator=gen).requires_grad_()
    out = moe_experts(x, index, weights, gate_up, down, backend=backend)
    out.sum().backward()
    assert gate_up.calls == 2 and down.calls == 2
    ref_x, ref_w = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    ref = moe_experts_reference(ref_x, index, ref_w, gate_up.dense, down.dense)
    ref.sum().backward()
    # fp32, only the summation order differs: relative to the magnitude (values reach ~1e3,
    # unseeded inputs exceeded a fixed 1e-4 in about one run of three)
    for name, got, want in (("out", out, ref), ("grad_x", x.grad, ref_x.grad),
                            ("grad_weights", weights.grad, ref_w.grad)):  # fmt: skip
        _diff(name, got.detach(), want.detach(), 1e-6 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", ["loop", "mm_loop", TRITON])
def test_expert_lora_as_grouped_products(backend: str) -> None:
    """Per-expert LoRA as rank-r grouped products equals the experts on the merged stacks
    ``W + s * lhs @ rhs`` (output and the gradients of input and of the four factors)."""
    gen = torch.Generator().manual_seed(5)
    experts, hidden, inter, r, tokens = 4, 16, 24, 3, 13
    index = routing(tokens, experts, 2, seed=5, skew=True)
    weights = torch.rand(tokens, 2, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up, down = (
        torch.randn(experts, 2 * inter, hidden, generator=gen),
        torch.randn(experts, hidden, inter, generator=gen),
    )
    factors = [torch.randn(experts, *s, generator=gen) for s in
               ((2 * inter, r), (r, hidden), (hidden, r), (r, inter))]  # fmt: skip
    grad = torch.randn(tokens, hidden, generator=gen)

    def run(grouped: bool):
        xs = x.clone().requires_grad_()
        fs = [f.clone().requires_grad_() for f in factors]
        gu_l, dn_l = ExpertLoRA(fs[0], fs[1], 0.5), ExpertLoRA(fs[2], fs[3], 0.5)
        if grouped:
            out = moe_experts(xs, index, weights, gate_up, down, backend=backend,
                              gate_up_lora=gu_l, down_lora=dn_l)  # fmt: skip
        else:
            merged_gu = gate_up + 0.5 * fs[0] @ fs[1]
            merged_dn = down + 0.5 * fs[2] @ fs[3]
            out = moe_experts_reference(xs, index, weights, merged_gu, merged_dn)
        out.backward(grad)
        return [out.detach(), xs.grad] + [f.grad for f in fs]

    names = ("out", "grad_x", "grad_gate_up_B", "grad_gate_up_A", "grad_down_B", "grad_down_A")
    for name, got, want in zip(names, run(True), run(False), strict=True):
        # fp32, only the summation order differs: relative to the magnitude (values reach ~1e3)
        _diff(name, got, want, 1e-5 * max(1.0, want.abs().max().item()))


@needs_interpreter
@pytest.mark.parametrize("strided", [False, True], ids=["rows", "column-strided"])
def test_gated_silu_writes_its_gradient_over_the_rows(strided: bool) -> None:
    """The fused activation (Triton): ``silu(gate) * up`` and the ``[d_gate | d_up]`` gradient
    equal the eager form's; on column-strided rows (no in-place write) through the fallback."""
    from turbotune.moe.experts import gated_activation

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(46, 13, generator=gen)  # [2I, S] transposed: column stride != 1
    rows = base.t() if strided else base.t().contiguous()
    grad = torch.randn(13, 23, generator=gen)
    x = rows.detach().clone().requires_grad_()
    out = gated_activation(x.view_as(x) if strided else x * 1.0, "silu")
    out.backward(grad)
    ref_x = rows.detach().clone().requires_grad_()
    gate, up = ref_x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    ref.backward(grad)
    _diff("out", out.detach(), ref.detach(), 1e-5)
    _diff("grad gate_up", x.grad, ref_x.grad, 1e-5)
