"""On the GPU, at real shapes: a padding-free bf16 batch gives the padded batch's loss and
gradients, unpatched and with the fused kernels.

A Llama of real per-layer shape (hidden 2048, 16 heads of 128, 4 KV heads, SwiGLU 5632, vocab
32000; 2 layers) with random weights, and real GSM8K/Alpaca-like lengths up to 1000 tokens.
The reference is the padded batch in fp32 (transformers' SDPA with the padding mask). Each bf16
run is judged by the flash-attention rule: its error against the fp32 reference is at most ~2x
the error of the padded bf16 run (plus a small floor for values near zero).
"""

from __future__ import annotations

import copy

import pytest
import torch

from turbotune.attention import use_varlen_attention
from turbotune.data import PaddedCollator
from turbotune.data.padding_free import PaddingFreeCollator

pytestmark = pytest.mark.gpu

SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
    tie_word_embeddings=False,
)  # fmt: skip
LENGTHS = (1000, 37, 412, 196, 733, 5)


def model_fp32():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **SHAPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda()


def rows():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, SHAPE["vocab_size"], (n,), generator=g).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def on_gpu(batch):
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**on_gpu(batch)).loss
    loss.backward()
    return loss.detach().float(), {
        n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None
    }


def relative_errors(got, ref):
    loss, grads = got
    loss_ref, grads_ref = ref
    errors = {"loss": (loss - loss_ref).abs().item() / loss_ref.abs().item()}
    for name, g_ref in grads_ref.items():
        errors[name] = ((grads[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
    return errors


@pytest.fixture(scope="module")
def reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_fp32()
    model.train()
    ref = loss_and_grads(model, PaddedCollator(0)(rows()))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    padded_bf16 = relative_errors(loss_and_grads(bf16, PaddedCollator(0)(rows())), ref)
    return model, ref, padded_bf16


@pytest.mark.parametrize("fused", [False, True])
def test_padding_free_bf16_matches_padded_at_real_shape(reference, fused):
    from turbotune.patches import KINDS, apply_patches

    model, ref, padded_bf16 = reference
    packed = copy.deepcopy(model).to(torch.bfloat16)
    use_varlen_attention(packed)
    patches = apply_patches(packed, KINDS) if fused else None
    try:
        got = relative_errors(loss_and_grads(packed, PaddingFreeCollator()(rows())), ref)
    finally:
        if patches is not None:
            patches.undo()
    worst = {
        name: (err, padded_bf16[name])
        for name, err in got.items()
        if err > 2 * padded_bf16[name] + 2e-3
    }
    assert not worst, f"relative error (padding-free, padded bf16) over budget: {worst}"
