"""Fused LoRA projections (ops/lora.py) on GPTQ bases vs the unfused path on the dense weight."""

from __future__ import annotations

import pytest
import torch

from turbotune.adapters.lora import LoRALinear
from turbotune.ops.lora import LoRAWeights, Projection, lora_linear, lora_mlp, lora_qkv
from turbotune.ops.reference import (
    lora_linear_reference,
    lora_mlp_reference,
    lora_qkv_reference,
)
from turbotune.patches.forwards import lora_linear_forward, projection_of
from turbotune.quant.gptq_format import default_g_idx, pack_gptq
from turbotune.quant.gptq_linear import GPTQLinear
from turbotune.quant.weights import dense_weight, weight_shape

DTYPES = (torch.float32, torch.bfloat16)


def _gptq_base(
    out_f: int, in_f: int, seed: int, bits: int = 4, act_order: bool = True, group: int = 32
):
    """A GPTQLinear with random codes (act-order g_idx) and its dense fp32 weight."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-in_f // group)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    z = torch.randint(1, 1 << bits, (groups, out_f), generator=gen)
    s = (torch.rand(groups, out_f, generator=gen) + 0.5) * (4.0 / (1 << bits)) / in_f**0.5
    g = default_g_idx(in_f, group)
    if act_order:
        g = g[torch.randperm(in_f, generator=gen)]
    layer = GPTQLinear.from_tensors(*pack_gptq(q, z, s, g, bits), bits)
    return layer, layer.dequantize(torch.float32)


def _adapter(out_f: int, in_f: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) / r**0.5).requires_grad_()
    return {"A": a, "B": b}


def test_gptq_linear_is_a_weight_source():
    layer, w = _gptq_base(24, 64, seed=0)
    assert weight_shape(layer) == (24, 64)
    assert torch.equal(dense_weight(layer, torch.float32), w)
    buf = torch.zeros(30, 64, dtype=torch.bfloat16)
    dense_weight(layer, torch.bfloat16, out=buf[3:27])  # straight into a row block
    assert torch.equal(buf[3:27], layer.dequantize(torch.bfloat16)) and not buf[:3].any()


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float16), ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_on_gptq(parity, device, dtype, bias):
    tokens, in_f, out_f, r, s = 13, 96, 40, 5, 1.7
    base, w = _gptq_base(out_f, in_f, seed=1)
    base = base.to(device)
    master = {"x": torch.randn(tokens, in_f).requires_grad_(), **_adapter(out_f, in_f, r, 2)}
    if bias:
        master["bias"] = torch.randn(out_f).requires_grad_()

    def ours(x, A, B, bias=None):
        return lora_linear(x, base, LoRAWeights(A, B, s), bias)

    def ref(x, A, B, bias=None):
        return lora_linear_reference(x, w.to(x.device), LoRAWeights(A, B, s), bias)

    parity(ours, ref, master, dtype, device)


# hidden 96: q/k/v fold their adapters into one matmul; 3 bits and 8 bits bases mixed in
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_qkv_on_gptq(parity, device, dtype):
    """GQA shapes, k without adapter, v with a bias; q 4-bit, k 8-bit, v 3-bit."""
    tokens, hidden, r = 13, 96, 5
    outs, bits = {"q": 64, "k": 32, "v": 32}, {"q": 4, "k": 8, "v": 3}
    bases = {
        n: _gptq_base(o, hidden, seed=i, bits=bits[n]) for i, (n, o) in enumerate(outs.items())
    }
    modules = {n: b[0].to(device) for n, b in bases.items()}
    master = {"x": torch.randn(tokens, hidden).requires_grad_()}
    for n in ("q", "v"):
        ad = _adapter(outs[n], hidden, r, seed={"q": 10, "v": 11}[n])
        master[f"A{n}"], master[f"B{n}"] = ad["A"], ad["B"]
    master["bias_v"] = torch.randn(outs["v"]).requires_grad_()

    def projections(Aq, Bq, Av, Bv, bias_v, sources):
        return (
            (sources["q"], LoRAWeights(Aq, Bq, 2.0)),
            (sources["k"], None),
            (sources["v"], LoRAWeights(Av, Bv, 0.5), bias_v),
        )

    def ours(x, **t):
        return torch.cat(lora_qkv(x, *projections(**t, sources=modules)), dim=-1)

    def ref(x, **t):
        dense = {n: b[1].to(x.device) for n, b in bases.items()}
        return torch.cat(lora_qkv_reference(x, *projections(**t, sources=dense)), -1)

    parity(ours, ref, master, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,inter", [(96, 64), (64, 160)])
def test_lora_mlp_on_gptq(parity, device, dtype, hidden, inter):
    """Gate and down with adapters, up without; (64, 160) takes the 'wide' down backward."""
    tokens, r = 13, 5
    gate, up, down = (
        _gptq_base(o, i, seed=k)
        for k, (o, i) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)])
    )
    ag, ad = _adapter(inter, hidden, r, 20), _adapter(hidden, inter, r, 21)
    master = {"x": torch.randn(tokens, hidden).requires_grad_()}
    master.update(Ag=ag["A"], Bg=ag["B"], Ad=ad["A"], Bd=ad["B"])
    mods = [b[0].to(device) for b in (gate, up, down)]

    def ours(x, Ag, Bg, Ad, Bd):
        return lora_mlp(
            x, (mods[0], LoRAWeights(Ag, Bg, 2.0)), (mods[1], None),
            Projection(mods[2], LoRAWeights(Ad, Bd, 0.75)),
        )  # fmt: skip

    def ref(x, Ag, Bg, Ad, Bd):
        dense = [b[1].to(x.device) for b in (gate, up, down)]
        return lora_mlp_reference(
            x, (dense[0], LoRAWeights(Ag, Bg, 2.0)), (dense[1], None),
            (dense[2], LoRAWeights(Ad, Bd, 0.75)),
        )  # fmt: skip

    parity(ours, ref, master, dtype, device)


def test_custom_lora_layer_on_gptq_fuses(device):
    """turbotune's LoRALinear around a GPTQLinear: projection_of sees it, and the fused forward
    gives the unfused module's output and gradients (x, A, B)."""
    torch.manual_seed(0)
    base, _ = _gptq_base(40, 96, seed=3)
    base.bias = torch.nn.Parameter(torch.randn(40, dtype=torch.float16), requires_grad=False)
    layer = LoRALinear(base, r=4, alpha=8.0).to(device)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would hide dA
    proj = projection_of(layer)
    assert proj is not None and proj.base is base and proj.bias is base.bias
    x0 = torch.randn(2, 7, 96, device=device, dtype=torch.bfloat16)
    runs = {}
    for name, fn in (
        ("unfused", layer.forward),
        ("fused", lambda x: lora_linear_forward(layer, x)),
    ):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.float().square().sum().backward()
        runs[name] = [
            y,
            x.grad,
            layer.lora_A["default"].weight.grad,
            layer.lora_B["default"].weight.grad,
        ]
    for label, got, want in zip(("y", "dx", "dA", "dB"), runs["fused"], runs["unfused"]):
        diff = (got.float() - want.float()).abs()
        tol = 0.02 * want.float().abs().max() + 1e-3  # bf16 compute on both paths, other order
        assert diff.max() <= tol, f"{label}: max {diff.max():.3e} mean {diff.mean():.3e}"


def test_peft_lora_layer_on_gptq_fuses():
    """peft's LoRA Linear around a GPTQLinear (register_with_peft): the patched forward equals
    peft's own forward and gradients (x, A, B) in fp32."""
    from peft import LoraConfig, get_peft_model

    from turbotune.quant.gptq_linear import register_with_peft

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = _gptq_base(40, 96, seed=5)[0]
            self.norm = torch.nn.LayerNorm(96)  # peft reads the device off a parameter

        def forward(self, x):
            return self.q_proj(self.norm(x))

    config = register_with_peft(LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8))
    layer = get_peft_model(Tiny(), config).base_model.model.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would hide dA
    assert projection_of(layer) is not None
    x0 = torch.randn(7, 96)
    runs = {}
    for name, fn in (("peft", layer.forward), ("fused", lambda x: lora_linear_forward(layer, x))):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.square().sum().backward()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        runs[name] = [y, x.grad, a.grad, b.grad]
    for label, got, want in zip(("y", "dx", "dA", "dB"), runs["fused"], runs["peft"]):
        diff = (got - want).abs()
        assert diff.max() <= 1e-4 * want.abs().max(), f"{label}: max {diff.max():.3e}"


@pytest.mark.gpu
def test_lora_mlp_llama8b_gptq_gpu(parity):
    """Llama-3-8B MLP (4096 tokens, r 16) on 4-bit GPTQ bases, group 128, act-order: output and
    every gradient vs the unfused reference on the dequantized weights, bf16 and fp16."""
    m, h, i, r = 4096, 4096, 14336, 16
    shapes = [(i, h), (i, h), (h, i)]
    bases = [_gptq_base(o, n, seed=k, group=128) for k, (o, n) in enumerate(shapes)]
    mods = [b[0].cuda() for b in bases]
    dense = [b[1].cuda() for b in bases]
    master = {"x": torch.randn(m, h).requires_grad_()}
    for k, (o, n) in enumerate(shapes):
        ad = _adapter(o, n, r, seed=30 + k)
        master[f"A{k}"], master[f"B{k}"] = ad["A"], ad["B"]

    def ours(x, **t):
        return lora_mlp(x, *[(mods[k], LoRAWeights(t[f"A{k}"], t[f"B{k}"], 2.0)) for k in range(3)])

    def ref(x, **t):
        projs = [(dense[k], LoRAWeights(t[f"A{k}"], t[f"B{k}"], 2.0)) for k in range(3)]
        return lora_mlp_reference(x, *projs)

    for dtype in (torch.bfloat16, torch.float16):
        parity(ours, ref, master, dtype, torch.device("cuda"))
