"""QLoRA on MoE: expert stacks in NF4 (bitsandbytes' quantizer, our dequantizer), the patched
experts on them vs transformers' experts on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import TRITON, sparse_blocks, tiny_model

from turbotune.moe.quant import NF4ExpertStack, quantize_experts
from turbotune.patches import apply_patches

bnbf = pytest.importorskip("bitsandbytes.functional")


def test_stack_roundtrip_matches_bitsandbytes() -> None:
    w = torch.randn(3, 40, 32, dtype=torch.bfloat16)
    stack = NF4ExpertStack(w)
    want = bnbf.dequantize_4bit(stack.packed, stack.quant_state)
    got = stack.dequantize()
    assert got.shape == w.shape
    # The Triton dequantizer may round the nested scale once less than bnb: 1 bf16 ulp at most
    # (exactness is tests/ops/test_nf4.py's business).
    rel = ((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-6)).max()
    assert rel <= 2**-7, f"dequantized stack vs bnb: max relative diff {rel:.3e}"
    sqnr = 10 * torch.log10(w.float().pow(2).mean() / (got.float() - w.float()).pow(2).mean())
    assert sqnr > 18, f"NF4 SQNR {sqnr:.1f} dB"  # NF4 on Gaussian weights: ~20 dB


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", ["loop", TRITON])
def test_quantized_experts_match_dequantized_transformers(backend: str) -> None:
    model = tiny_model("mixtral").requires_grad_(False)
    block = sparse_blocks(model)[0]
    x = torch.randn(2, 6, model.config.hidden_size)
    assert quantize_experts(model) == 4  # 2 layers x (gate_up, down)
    stacks = (block.experts.gate_up_proj, block.experts.down_proj)
    assert all(isinstance(s, NF4ExpertStack) for s in stacks)
    # Reference: transformers' eager experts on the dequantized weights.
    reference = tiny_model("mixtral").requires_grad_(False)
    ref_block = sparse_blocks(reference)[0]
    ref_block.experts.gate_up_proj.data = stacks[0].dequantize()
    ref_block.experts.down_proj.data = stacks[1].dequantize()
    x_ref = x.clone().requires_grad_()
    want = ref_block(x_ref)
    want.square().sum().backward()

    apply_patches(model, ["moe"], moe_backend=backend)
    x_q = x.clone().requires_grad_()
    got = block(x_q)
    got.square().sum().backward()
    for name, a, b in (("out", got, want), ("grad_x", x_q.grad, x_ref.grad)):
        d = (a.detach() - b.detach()).abs()
        assert d.max() <= 2e-5, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"
