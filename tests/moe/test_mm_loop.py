"""The ``mm_loop`` expert backend (one ``mm`` per expert over slices of the sorted rows).

Against references it does not share code with: a per-row einsum for single products (every
layout, both gradients, empty and crowded experts), the eager per-expert loop for the expert MLP
(trainable and frozen stacks, quantized-like stacks, expert LoRA), transformers' own sparse
block and whole tiny models (loss, aux loss, router logits, every gradient). Also: one host read
of the row counts per layer (none in backward), and the ``auto`` rule.
"""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import (
    FAMILIES,
    DequantizableStack,
    routing,
    run_block,
    sparse_blocks,
    tiny_model,
)

from turbotune.moe.expert_gemm import expert_gemm
from turbotune.moe.experts import ExpertLoRA, moe_experts, prefers_mm_loop, resolve_backend
from turbotune.moe.plan import plan_experts
from turbotune.moe.reference import moe_experts_reference
from turbotune.patches import apply_patches


def _diff(name: str, got: torch.Tensor | None, want: torch.Tensor | None, atol: float) -> None:
    assert (got is None) == (want is None), f"{name}: gradient presence differs"
    if want is None:
        return
    d = (got.float() - want.float()).abs()
    assert d.max() <= atol, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"


def _rowwise(a, w, index, layout: str):
    """The product by rows: ``out[r] = a[in_row(r)] @ w[e(r)]^T`` with ``r`` sorted, or in slot
    order for ``scatter`` (an einsum over per-row weight copies: no slicing, no sort bounds)."""
    plan = plan_experts(index, w.shape[0])
    sorted_expert = index.reshape(-1)[plan.order]
    in_rows = plan.order // plan.top_k if layout == "gather" else torch.arange(plan.num_slots)
    out = torch.einsum("sk,snk->sn", a[in_rows], w[sorted_expert])
    if layout == "scatter":
        out = out[plan.row_of_slot]
    return out


@pytest.mark.parametrize("layout", ["gather", "scatter", "sorted"])
@pytest.mark.parametrize(("tokens", "k_in", "n_out", "experts", "k", "skew"), [
    (37, 24, 20, 5, 2, True), (3, 16, 16, 4, 1, False), (29, 33, 17, 7, 3, True),
])  # fmt: skip
def test_expert_gemm_mm_loop(layout, tokens, k_in, n_out, experts, k, skew) -> None:
    index = routing(tokens, experts, k, seed=tokens, skew=skew)
    plan = plan_experts(index, experts).on_host()
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(tokens if layout == "gather" else tokens * k, k_in, generator=gen)
    w = torch.randn(experts, n_out, k_in, generator=gen)
    grad = torch.randn(tokens * k, n_out, generator=gen)
    results = []
    for fast in (True, False):
        a_, w_ = a.clone().requires_grad_(), w.clone().requires_grad_()
        if fast:
            out = expert_gemm(a_, w_, plan, layout=layout, backend="mm_loop")
        else:
            out = _rowwise(a_, w_, index, layout)
        out.backward(grad)
        results.append((out.detach(), a_.grad, w_.grad))
    for name, got, want in zip(("out", "grad_a", "grad_w"), *results, strict=True):
        _diff(name, got, want, 1e-4)
    if skew:  # the empty expert's gradient slice is zero-filled, not left uninitialized
        assert plan.sizes[-1] == 0 and results[0][2][-1].abs().max() == 0


def _mlp_inputs(seed: int = 5, tokens: int = 13, skew: bool = True):
    gen = torch.Generator().manual_seed(seed)
    experts, hidden, inter = 4, 16, 24
    index = routing(tokens, experts, 2, seed=seed, skew=skew)
    x = torch.randn(tokens, hidden, generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen)
    down = torch.randn(experts, hidden, inter, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen)
    return x, index, weights, gate_up, down, grad


def _run_mlp(fn, x, index, weights, gate_up, down, grad, trainable: bool):
    leaves = [x, weights] + ([gate_up, down] if trainable else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    xs, ws = leaves[:2]
    gu, dn = leaves[2:] if trainable else (gate_up, down)
    out = fn(xs, index, ws, gu, dn)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
def test_moe_experts_mm_loop_matches_reference(trainable: bool) -> None:
    """Output and the gradients of input, routing weights and (trainable) both stacks."""
    args = _mlp_inputs()
    got = _run_mlp(lambda *a: moe_experts(*a, backend="mm_loop"), *args, trainable)
    want = _run_mlp(moe_experts_reference, *args, trainable)
    names = ("out", "grad_x", "grad_weights", "grad_gate_up", "grad_down")
    for name, g, w in zip(names, got, want):  # frozen: only the first three
        # fp32, only the summation order differs: relative to the magnitude (values reach ~1e3)
        _diff(name, g, w, 1e-5 * max(1.0, w.abs().max().item()))


def test_one_host_read_of_the_counts_per_layer(monkeypatch) -> None:
    """The layer reads its row counts on the host once; backward reuses them (no sync there)."""
    x, index, weights, gate_up, down, grad = _mlp_inputs(tokens=40, skew=False)
    calls = []
    tolist = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    out = moe_experts(leaves[0], index, leaves[1], *leaves[2:], backend="mm_loop")
    assert calls == [(4,)], f"forward host reads: {calls}"
    out.backward(grad)
    assert calls == [(4,)], f"backward read the counts again: {calls}"
    assert all(t.grad is not None for t in leaves)


def test_quantized_stacks_with_lora() -> None:
    """QLoRA-style: stacks behind ``.dequantize`` (dequantized once in forward, once in backward)
    plus per-expert LoRA, against the eager loop on the merged dense stacks."""
    x, index, weights, gate_up, down, grad = _mlp_inputs(seed=7)
    gen = torch.Generator().manual_seed(7)
    experts, hidden, inter, r = down.shape[0], down.shape[1], down.shape[2], 3
    shapes = ((2 * inter, r), (r, hidden), (hidden, r), (r, inter))
    factors = [torch.randn(experts, *s, generator=gen) for s in shapes]

    def run(fast: bool):
        xs = x.clone().requires_grad_()
        fs = [f.clone().requires_grad_() for f in factors]
        if fast:
            gu, dn = DequantizableStack(gate_up), DequantizableStack(down)
            out = moe_experts(xs, index, weights, gu, dn, backend="mm_loop",
                              gate_up_lora=ExpertLoRA(fs[0], fs[1], 0.5),
                              down_lora=ExpertLoRA(fs[2], fs[3], 0.5))  # fmt: skip
        else:
            merged_gu, merged_dn = gate_up + 0.5 * fs[0] @ fs[1], down + 0.5 * fs[2] @ fs[3]
            out = moe_experts_reference(xs, index, weights, merged_gu, merged_dn)
        out.backward(grad)
        if fast:
            assert gu.calls == 2 and dn.calls == 2
        return [out.detach(), xs.grad] + [f.grad for f in fs]

    names = ("out", "grad_x", "grad_gate_up_B", "grad_gate_up_A", "grad_down_B", "grad_down_A")
    for name, got, want in zip(names, run(True), run(False), strict=True):
        _diff(name, got, want, 1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frozen_experts_block_matches_transformers(family: str) -> None:
    """Experts frozen (the LoRA/QLoRA case): output, router logits, input and router gradients
    equal transformers' block; the stacks get no gradient."""
    torch.set_num_threads(1)
    model = tiny_model(family)
    block = sparse_blocks(model)[0]
    block.experts.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, model.config.hidden_size, generator=gen)
    grad = torch.randn(2, 9, model.config.hidden_size, generator=gen)
    want = run_block(block, x, grad)
    apply_patches(model, ["moe"], moe_backend="mm_loop")
    got = run_block(block, x, grad)
    assert got.keys() == want.keys() and not any("experts" in k for k in got)
    for name, ref in want.items():
        _diff(name, got[name], ref, 2e-5)


def test_model_loss_aux_loss_and_gradients() -> None:
    """A whole tiny Mixtral with ``output_router_logits``: loss (with the router's aux loss), the
    aux loss itself, every layer's router logits and every parameter gradient."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    runs = []
    for patched in (False, True):
        model = tiny_model("mixtral")
        if patched:
            apply_patches(model, ["moe"], moe_backend="mm_loop")
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        runs.append((out.loss.detach(), out.aux_loss.detach(), out.router_logits, grads))
    (loss, aux, logits, grads), (p_loss, p_aux, p_logits, p_grads) = runs
    _diff("loss", p_loss, loss, 1e-5)
    _diff("aux_loss", p_aux, aux, 1e-6)
    assert aux > 0 and len(logits) == len(p_logits) == 2
    for i, (a, b) in enumerate(zip(p_logits, logits, strict=True)):
        _diff(f"router_logits[{i}]", a.detach(), b.detach(), 1e-5)
    assert p_grads.keys() == grads.keys()
    for name, g in grads.items():
        _diff(f"grad {name}", p_grads[name], g, 5e-5)


def test_auto_rule() -> None:
    """``auto`` takes the per-expert loop for few experts with many rows each (Mixtral-8x7B at
    8192 tokens), not for many small experts (Qwen3-30B-A3B) or few rows (Mixtral at 1024
    tokens); on CPU ``auto`` stays the loop, and an explicit ``mm_loop`` runs wherever ``mm``
    does."""
    assert prefers_mm_loop(8192 * 2, 8)
    assert not prefers_mm_loop(1024 * 2, 8)
    assert not prefers_mm_loop(8192 * 8, 128)
    assert not prefers_mm_loop(0, 0)
    x = torch.zeros(8192, 8)
    assert resolve_backend("auto", x, 8, 2) == "loop"
    assert resolve_backend("mm_loop", x, 128, 8) == "mm_loop"


@pytest.mark.parametrize("section", ["fused_ops", "expert_parallel"])
def test_every_backend_is_a_config_choice(section: str) -> None:
    """Each backend ``moe_experts`` takes can be named in a config (``mm_loop`` once was not)."""
    import typing

    import turbotune
    from turbotune.moe.experts import BackendChoice

    key = "moe_backend" if section == "fused_ops" else "backend"
    extra = (
        {}
        if section == "fused_ops"
        else {"distributed": {"enabled": True, "low_memory_loading": False}}
    )
    for backend in typing.get_args(BackendChoice):
        fw = turbotune.AccelerationFramework({"plugins": {section: {key: backend}}, **extra})
        plugin = next(p for p in fw.plugins if p.name == section)
        assert getattr(plugin.config, key) == backend
