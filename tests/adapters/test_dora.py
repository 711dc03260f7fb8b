"""turbotune's own DoRA layer against peft's DoRA (``use_dora=True``), layer by layer.

The custom layer repeats peft's DoRA computation op for op (same casts, same order, the same
single dropout call), so given the same adapter weights the comparisons with peft are *exact*
(``torch.equal``) on fp32, bf16 and NF4 bases, with and without dropout (one ``nn.Dropout``
call on the same-shaped tensor on both sides: the RNG stream is consumed alike, so a fixed seed
gives both the same mask). Independent of peft, the layer is also checked against the DoRA
formula written out, and on NF4 / GPTQ bases against the same layer on the dequantized weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turbotune.adapters.dora import DoRALinear, native_dtype
from turbotune.adapters.lora import apply_custom_lora
from turbotune.adapters.peft_lora import apply_lora, lora_config
from turbotune.config import AdapterConfig

A, B, M = "lora_A", "lora_B", "lora_magnitude_vector"


@pytest.fixture(autouse=True)
def one_thread_eager_dequant(monkeypatch):
    """One thread (tiny shapes on a shared machine); NF4 dequantized by the eager reference,
    which gives bitsandbytes' values bit for bit (peft dequantizes with bitsandbytes; the Triton
    kernel, interpreted here, rounds ``code * absmax`` once from fp32 and can land an ulp away)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diff_msg(ours: torch.Tensor, ref: torch.Tensor) -> str:
    d = (ours.float() - ref.float()).abs()
    return f"max abs diff {d.max():.3e}, mean {d.mean():.3e} at {tuple(d.argmax().tolist() if d.dim() == 0 else divmod(int(d.argmax()), d.shape[-1]))}"


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} vs {ref.dtype}"
    assert torch.equal(ours, ref), f"{what}: {diff_msg(ours, ref)}"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float, atol: float):
    ok = torch.allclose(ours.float(), ref.float(), rtol=rtol, atol=atol)
    assert ok, f"{what}: {diff_msg(ours, ref)} (rtol {rtol}, atol {atol})"


def nf4_linear(n_in: int, n_out: int, compute=torch.bfloat16, bias=False, seed=0) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    # bf16 weights quantized, as transformers quantizes a bf16 checkpoint: dequantized in bf16
    dense = nn.Linear(n_in, n_out, bias=bias).to(torch.bfloat16)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = nn.Parameter(dense.bias.data.to(compute), requires_grad=False)
    return q.to("cpu")  # quantizes


class Holder(nn.Module):
    """A one-projection model; ``scale`` gives ``weights_dtype: compute`` its dtype."""

    def __init__(self, proj: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def dora_cfg(**extra) -> AdapterConfig:
    keys = {"method": "dora", "r": 4, "alpha": 8, "target_modules": ["proj"], **extra}
    return AdapterConfig(implementation="custom", **keys)


def peft_layer(base: nn.Module, cfg: AdapterConfig, compute: torch.dtype) -> nn.Module:
    config = lora_config(cfg)
    assert config.use_dora
    config.task_type = None  # a bare module, not a causal LM
    holder = Holder(base, compute)
    holder.is_loaded_in_4bit = base.weight.dtype == torch.uint8
    dtype = compute if cfg.weights_dtype == "compute" else None
    return apply_lora(holder, config, adapter_dtype=dtype).base_model.model.proj


def layer_pair(base: nn.Module, cfg: AdapterConfig, compute: torch.dtype, randomize=True):
    """(peft DoRA layer, custom DoRA layer) over the same frozen base; equal random A, B, m."""
    base.requires_grad_(False)
    ref = peft_layer(base, cfg, compute)
    ours = apply_custom_lora(Holder(base, compute), cfg).proj
    assert isinstance(ours, DoRALinear)
    if randomize:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for part in (A, B, M):  # B non-zero and m off the norm: every term must matter
                p_ref = getattr(ref, part)["default"].weight
                noise = torch.randn(p_ref.shape, generator=g)
                w = p_ref.float() * (1 + 0.2 * noise) if part == M else 0.3 * noise
                p_ref.copy_(w)
                getattr(ours, part)["default"].weight.copy_(w)
    return ref, ours


def run(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, seed: int = 0):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout mask on both sides
    y = layer(x)
    y.backward(grad_out)
    grads = [getattr(layer, part)["default"].weight.grad for part in (A, B, M)]
    return (y, x.grad, *grads)


NAMES = ("output", "grad x", "grad A", "grad B", "grad magnitude")

CASES = {
    # name: (base builder, input dtype, weights_dtype, extra adapter keys)
    "dense-fp32-bias": (lambda: nn.Linear(37, 53, bias=True), torch.float32, "float32", {}),
    "dense-fp32-dropout-rslora": (lambda: nn.Linear(37, 53, bias=True), torch.float32, "float32",
                                  {"dropout": 0.3, "use_rslora": True}),
    "dense-bf16-fp32-adapter": (lambda: nn.Linear(37, 53).to(torch.bfloat16), torch.bfloat16,
                                "float32", {}),
    "dense-bf16-bias-dropout": (lambda: nn.Linear(37, 53, bias=True).to(torch.bfloat16),
                                torch.bfloat16, "float32", {"dropout": 0.25}),
    "dense-bf16-bf16-adapter": (lambda: nn.Linear(37, 53).to(torch.bfloat16), torch.bfloat16,
                                "compute", {"dropout": 0.1}),
    "nf4-fp32-adapter": (lambda: nf4_linear(64, 48), torch.bfloat16, "float32", {}),
    "nf4-bias-dropout": (lambda: nf4_linear(64, 48, bias=True), torch.bfloat16, "float32",
                         {"dropout": 0.2}),
    "nf4-bf16-adapter": (lambda: nf4_linear(64, 48), torch.bfloat16, "compute", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_layer_forward_and_every_gradient_equal_peft(case):
    make_base, x_dtype, weights_dtype, extra = CASES[case]
    base = make_base()
    ref, ours = layer_pair(base, dora_cfg(weights_dtype=weights_dtype, **extra), x_dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, base.in_features, generator=g).to(x_dtype)
    grad_out = torch.randn(3, 5, base.out_features, generator=g).to(x_dtype)
    for mode in ("train", "eval"):  # eval: dropout off, the base output is reused
        ref.train(mode == "train"), ours.train(mode == "train")
        for name, o, r in zip(NAMES, run(ours, x, grad_out), run(ref, x, grad_out)):
            assert_same(o, r, f"{case} {mode} {name}")
        for layer in (ref, ours):
            layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", ["dense-fp32-bias", "dense-bf16-fp32-adapter", "nf4-fp32-adapter"])
def test_initial_magnitude_equals_peft(case):
    """At creation m = ||W||_row, in the base's dtype, exactly as peft computes it."""
    make_base, x_dtype, weights_dtype, _ = CASES[case]
    ref, ours = layer_pair(make_base(), dora_cfg(weights_dtype=weights_dtype), x_dtype, False)
    m_ours, m_ref = (
        ours.lora_magnitude_vector["default"].weight,
        ref.lora_magnitude_vector["default"].weight,
    )
    assert m_ours.requires_grad and m_ours.shape == (ours.out_features,)
    assert_same(m_ours.detach(), m_ref.detach(), f"{case} initial magnitude")
    # B = 0 at init, so the layer computes the base exactly (up to the dtype round trip).
    x = torch.randn(4, ours.in_features).to(x_dtype)
    assert_close(ours(x), ours.base_layer(x), f"{case} identity at init", 1e-2, 1e-2)


def test_layer_matches_the_dora_formula():
    """Independent of peft: m * (W + s B A) x / ||W + s B A||_row + bias, on an fp32 base."""
    base = nn.Linear(37, 53).requires_grad_(False)
    layer = DoRALinear(base, r=4, alpha=8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        b.normal_()
        m.mul_(1.5)
    x = torch.randn(3, 5, 37)
    w = base.weight + 2.0 * b @ a
    expected = x @ (m[:, None] * w / w.norm(dim=1, keepdim=True)).T + base.bias
    d = (layer(x) - expected).abs()
    assert d.max() < 1e-5, f"max abs diff {d.max():.3e}, mean {d.mean():.3e}"


def test_norm_is_detached_as_in_the_paper():
    """Section 4.3: ||W + s B A|| gets no gradient; so grad A equals that of a layer whose norm
    is a frozen copy, and differs from the one where the norm is differentiated."""
    torch.manual_seed(1)
    base = nn.Linear(16, 12).requires_grad_(False)
    layer = DoRALinear(base, r=2, alpha=4)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        b.normal_()
    x = torch.randn(7, 16)
    layer(x).square().sum().backward()

    def by_hand(detach: bool) -> torch.Tensor:
        a2 = a.detach().clone().requires_grad_(True)
        w = base.weight + 2.0 * b.detach() @ a2
        norm = w.norm(dim=1, keepdim=True)
        norm = norm.detach() if detach else norm
        (x @ (m.detach()[:, None] * w / norm).T + base.bias).square().sum().backward()
        return a2.grad

    assert_close(a.grad, by_hand(True), "grad A vs detached norm", 1e-4, 1e-5)
    d = (a.grad - by_hand(False)).abs().max()
    assert d > 1e-3, f"grad A also matches the non-detached norm (max diff {d:.2e}): test is blind"


def quantized_linear(kind: str, n_in: int = 64, n_out: int = 48) -> nn.Module:
    """A real quantized layer of each format turbotune trains on (bf16 compute)."""
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, bias=kind == "gptq").to(torch.bfloat16)
    if kind == "nf4":
        return nf4_linear(n_in, n_out)
    if kind == "gptq":
        from turbotune.quant.gptq_linear import GPTQLinear

        return GPTQLinear.from_linear(dense, bits=4, group_size=32)
    from turbotune.quant.hqq_linear import HQQLinear

    return HQQLinear.from_linear(dense, bits=4, group_size=32)


def _dense_twin(quantized: nn.Module, dtype: torch.dtype) -> nn.Linear:
    from turbotune.quant.weights import dense_weight

    bias = quantized.bias
    twin = nn.Linear(quantized.in_features, quantized.out_features, bias=bias is not None)
    twin = twin.to(dtype)
    with torch.no_grad():
        twin.weight.copy_(dense_weight(quantized, native_dtype(quantized) or dtype).to(dtype))
        if bias is not None:
            twin.bias.copy_(bias)
    return twin.requires_grad_(False)


@pytest.mark.parametrize("kind", ["nf4", "gptq", "hqq"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_quantized_base_equals_dequantized_base(kind, dropout):
    """Custom DoRA on a quantized base (bitsandbytes NF4, GPTQLinear, HQQLinear: read through
    ``dense_weight`` only) vs on the same weight dequantized into a bf16 Linear: the DoRA maths
    sees the same dense weight, so outputs and every gradient agree; only the base matmul may
    differ (each format's own matmul vs a bf16 one), hence the bf16 tolerance."""
    base = quantized_linear(kind)
    base.requires_grad_(False)
    twin = _dense_twin(base, torch.bfloat16)
    torch.manual_seed(2)
    q_layer = DoRALinear(base, r=4, alpha=8, dropout=dropout)
    torch.manual_seed(2)
    d_layer = DoRALinear(twin, r=4, alpha=8, dropout=dropout)
    m_q = q_layer.lora_magnitude_vector["default"].weight
    m_d = d_layer.lora_magnitude_vector["default"].weight
    # GPTQLinear names no compute dtype, so (as peft) its norm is taken in fp32, the twin's in
    # bf16: close, not equal. Then both start from the same magnitude.
    assert_close(m_q, m_d, f"{kind} initial magnitude", rtol=1e-2, atol=0)
    if kind in ("nf4", "hqq"):
        assert_same(m_q.detach(), m_d.detach(), f"{kind} initial magnitude")
    with torch.no_grad():
        m_d.copy_(m_q)
    with torch.no_grad():
        for part in (B,):
            w = torch.randn(getattr(q_layer, part)["default"].weight.shape) * 0.3
            getattr(q_layer, part)["default"].weight.copy_(w)
            getattr(d_layer, part)["default"].weight.copy_(w)
    x = torch.randn(2, 6, 64).to(torch.bfloat16)
    grad_out = torch.randn(2, 6, 48).to(torch.bfloat16)
    for name, o, r in zip(NAMES, run(q_layer, x, grad_out), run(d_layer, x, grad_out)):
        # bf16 outputs: 1 ulp at |y|~2 is 1.6e-2; fp32 adapter grads sum bf16-rounded products.
        assert_close(o, r, f"{kind} dropout={dropout} {name}", rtol=2e-2, atol=2e-2)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_linear_equals_f_linear_and_saves_no_weight(autocast):
    """The dropout path's ``W d(x)``: same output and input gradient as ``F.linear`` on the
    dequantized weight (with and without bf16 autocast), without saving the weight."""
    from turbotune.adapters.dora import _base_dense, frozen_linear

    base = nf4_linear(64, 48).requires_grad_(False)
    x = torch.randn(3, 7, 64)
    grad = torch.randn(3, 7, 48)
    outs = []
    for fn in (lambda x: torch.nn.functional.linear(x, _base_dense(base, x.dtype)),
               lambda x: frozen_linear(x, base)):  # fmt: skip
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = fn(xi)
        y.backward(grad.to(y.dtype))
        outs.append((y, xi.grad))
    for name, o, r in zip(("output", "grad x"), outs[1], outs[0]):
        assert_same(o, r, f"autocast={autocast} {name}")
    xi = x.clone().requires_grad_(True)
    assert _saved_bytes(lambda: frozen_linear(xi, base)) == 0


def test_dropout_path_keeps_no_dense_weight_alive():
    """Under dropout peft saves the dense fp32 weight for backward; the custom layer does not."""
    base = nf4_linear(256, 192)
    ref, ours = layer_pair(base, dora_cfg(dropout=0.1), torch.bfloat16)
    x = torch.randn(2, 3, 256).to(torch.bfloat16).requires_grad_(True)
    dense = 256 * 192 * 4
    saved_ref, saved_ours = _saved_bytes(lambda: ref(x)), _saved_bytes(lambda: ours(x))
    assert saved_ref - saved_ours >= dense, f"saved: peft {saved_ref:,} B, ours {saved_ours:,} B"


def test_reset_magnitude_restores_the_creation_value():
    base = nf4_linear(64, 48)
    layer = DoRALinear(base, r=4, alpha=8)
    m = layer.lora_magnitude_vector["default"].weight
    start = m.detach().clone()
    with torch.no_grad():
        m.fill_(3.0)
    layer.reset_magnitude()
    assert_same(m.detach(), start, "magnitude after reset")
