"""The shardable NF4 storage on a GPU at the reference workload's shapes: the Triton dequantizer
against the eager reference, quantization quality, and the fused LoRA projection over it."""

from __future__ import annotations

import pytest
import torch

from turbotune.distributed.nf4 import NF4Linear
from turbotune.ops.lora import LoRAWeights, lora_linear
from turbotune.ops.reference import dequantize_4bit_reference, lora_linear_reference

pytestmark = pytest.mark.gpu


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (1024, 4096), (4097, 333)])
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_quantize_and_dequantize_at_real_shapes(shape, nested):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    layer = NF4Linear.from_linear(lin, double_quant=nested)
    got = layer.dequantize(torch.bfloat16)
    state = layer.quant_state()
    ref = dequantize_4bit_reference(state.nibbles, state, torch.bfloat16)
    # The kernel may fuse the nested scale into one FMA (1 fp32 ulp before the bf16 rounding).
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-3), _diff(got, ref)
    assert (got != ref).float().mean() < 1e-3, "more than 0.1% of the values differ"
    sqnr = 10 * torch.log10(w.float().pow(2).sum() / (w.float() - got.float()).pow(2).sum())
    assert sqnr > 20.0, f"NF4 SQNR {sqnr:.2f} dB (about 20.7 dB expected on Gaussian weights)"


def test_gpu_fused_lora_over_nf4_storage_matches_the_reference():
    torch.manual_seed(1)
    lin = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(lin)
    a = (torch.randn(16, 4096, device="cuda") * 0.01).requires_grad_(True)
    b = (torch.randn(1024, 16, device="cuda") * 0.01).requires_grad_(True)
    x = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lora_linear(x, layer, LoRAWeights(a, b, 1.0, 0.0))
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantize(torch.float32)
    refs = [t.detach().float().clone().requires_grad_(True) for t in (x, a, b)]
    y_ref = lora_linear_reference(refs[0], w, LoRAWeights(refs[1], refs[2], 1.0, 0.0))
    y_ref.backward(g.float())
    # bf16 compute vs an fp32 reference over a 4096-long reduction: bf16 rounding of the output
    # (2^-8 relative) dominates; the bound is 2x that of plain bf16 F.linear against fp32.
    y_bf16 = torch.nn.functional.linear(x.detach(), w.to(torch.bfloat16)).float()
    bound = 2 * (y_bf16 - refs[0].detach() @ w.t()).abs().max().item() + 1e-2
    assert (y.float() - y_ref).abs().max().item() <= bound, _diff(y, y_ref)
    for name, got, ref in zip("xab", (x.grad, a.grad, b.grad), (r.grad for r in refs)):
        scale = ref.abs().max().item()
        err = (got.float() - ref).abs().max().item()
        assert err <= 2e-2 * scale, f"d{name}: {_diff(got, ref)} (scale {scale:.3g})"
