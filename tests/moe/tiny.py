"""Tiny MoE models of each family, built from a config (shared by the MoE tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Dots1Config,
    Dots1ForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    MiniMaxConfig,
    MiniMaxForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from turbotune.ops._triton import use_triton

# The Triton kernels run on CPU tensors only through the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 on machines without CUDA); a GPU machine runs them in tests/moe/test_gpu.py.
needs_interpreter = pytest.mark.skipif(
    not use_triton(torch.zeros(1)), reason="CPU Triton needs TRITON_INTERPRET=1"
)
TRITON = pytest.param("triton", marks=needs_interpreter)

_COMMON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=64, output_router_logits=True,
    router_aux_loss_coef=0.02, tie_word_embeddings=False,
)  # fmt: skip


def _qwen3_next(*layer_types: str) -> Qwen3NextConfig:
    """A tiny Qwen3-Next of two layers of ``layer_types``: shared expert, top-2 of 6."""
    return Qwen3NextConfig(
        num_hidden_layers=2, layer_types=list(layer_types), intermediate_size=40,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
        num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
    )  # fmt: skip


FAMILIES = {
    # Mixtral: softmax over all experts, top-2, renormalized; fp32 routing weights.
    "mixtral": (
        MixtralForCausalLM,
        lambda: MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    ),
    # Qwen2-MoE: shared expert with a sigmoid gate; no renormalization (norm_topk_prob=False).
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        lambda: Qwen2MoeConfig(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    # Qwen3-MoE: renormalized top-3 of 8; q/k norms in attention.
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(
            intermediate_size=40,
            moe_intermediate_size=20,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    # Granite-MoE: top-k of the logits, then softmax over the k; logits scaling and multipliers.
    "granitemoe": (
        GraniteMoeForCausalLM,
        lambda: GraniteMoeConfig(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            logits_scaling=2.0,
        ),
    ),
    # OLMoE: softmax top-2 of 4, not renormalized; q/k norms over the whole projection. No
    # clip_qkv (as the released checkpoints): its in-place clamp fails on the patched norm's output.
    "olmoe": (
        OlmoeForCausalLM,
        lambda: OlmoeConfig(intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    ),
    # Granite-MoE-Shared: a shared MLP beside the sparse block; multipliers on every branch.
    "granitemoeshared": (
        GraniteMoeSharedForCausalLM,
        lambda: GraniteMoeSharedConfig(
            intermediate_size=24,
            shared_intermediate_size=20,
            num_local_experts=4,
            num_experts_per_tok=2,
            logits_scaling=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3,
        ),
    ),
    # FlexOlmo: OLMo-2 post-norm layers, top-2 of 5.
    "flex_olmo": (
        FlexOlmoForCausalLM,
        lambda: FlexOlmoConfig(
            intermediate_size=24, num_experts=5, num_experts_per_tok=2, pad_token_id=0
        ),
    ),
    # Qwen3-Next: gated-attention layers (every layer fused in tests/patches' add_norm test;
    # a linear-attention layer keeps the plain layer), shared expert, top-2 of 6.
    "qwen3_next": (
        Qwen3NextForCausalLM,
        lambda: _qwen3_next("full_attention", "full_attention"),
    ),
    # MiniMax: one lightning-attention and one softmax-attention layer, alpha/beta residuals.
    "minimax": (
        MiniMaxForCausalLM,
        lambda: MiniMaxConfig(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            full_attn_alpha_factor=0.8,
            mlp_beta_factor=1.5,
        ),
    ),
}

# Models for the whole-model and block parity tests only (Ernie also in tests/patches' add_norm
# test). Ernie and PhiMoE: test_mm_loop's frozen-experts test cannot take them as it stands: it
# runs a block twice unseeded (PhiMoE samples its experts while training) and tells expert
# gradients by the name "experts" (Ernie's trainable ``shared_experts``). They join FAMILIES
# once that test seeds and matches ``experts.`` only.
MORE_FAMILIES = {
    # Qwen3-Next with a linear-attention (gated delta net) layer: that layer keeps transformers'
    # own decoder layer around patched norms and MoE (tests/patches' add_norm test wants every
    # layer fused, so FAMILIES' qwen3_next has gated attention only).
    "qwen3_next_hybrid": (
        Qwen3NextForCausalLM,
        lambda: _qwen3_next("linear_attention", "full_attention"),
    ),
    # Ernie 4.5 MoE: score-corrected top-2 of 6, a shared expert, biases in every linear.
    "ernie4_5_moe": (
        Ernie4_5_MoeForCausalLM,
        lambda: Ernie4_5_MoeConfig(
            intermediate_size=40,
            moe_intermediate_size=16,
            moe_num_experts=6,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=0,
            use_bias=True,
        ),
    ),
    # PhiMoE: sparsemixer (top-2 sampled while training: the tests seed each step); LayerNorms,
    # a biased LM head.
    "phimoe": (
        PhimoeForCausalLM,
        lambda: PhimoeConfig(
            intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, lm_head_bias=True
        ),
    ),
    # Routers with a score-correction bias and no auxiliary loss (router logits, no aux loss).
    # DeepSeek-V3: grouped top-k (2 groups, 1 kept), latent attention (kv heads = heads).
    "deepseek_v3": (
        DeepseekV3ForCausalLM,
        lambda: DeepseekV3Config(
            intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, pad_token_id=0,
        ),
        {"num_key_value_heads": 4},
    ),
    "glm4_moe": (
        Glm4MoeForCausalLM,
        lambda: Glm4MoeConfig(
            intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=0, use_qk_norm=True, head_dim=8, pad_token_id=0,
        ),
    ),
    "dots1": (
        Dots1ForCausalLM,
        lambda: Dots1Config(
            intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=0, head_dim=8, pad_token_id=0,
        ),
    ),
    "hunyuan_v1_moe": (
        HunYuanMoEV1ForCausalLM,
        lambda: HunYuanMoEV1Config(
            intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8, pad_token_id=0,
            eod_token_id=1, bos_token_id=1, eos_token_id=1,
        ),
    ),
}  # fmt: skip


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny model of ``family`` with random (non-zero) routers, eager attention and experts."""
    cls, make_config, *overrides = FAMILIES[family] if family in FAMILIES else MORE_FAMILIES[family]
    config = make_config()
    for key, value in {**_COMMON, **(overrides[0] if overrides else {})}.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for p in model.parameters():  # Qwen initializes routers to zero: ties in top-k
            p.normal_(0.0, 0.15)
    return model


def sparse_blocks(model) -> list[torch.nn.Module]:
    """The sparse MoE block of every layer."""
    blocks = []
    for layer in model.model.layers:
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        if hasattr(block, "experts"):
            blocks.append(block)
    return blocks


def routing(tokens: int, experts: int, k: int, seed: int, skew: bool) -> torch.Tensor:
    """``[tokens, k]`` expert ids from seeded scores; ``skew``: expert 0 takes most tokens
    (more than one kernel block), the last expert none."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    if skew:
        scores[:, 0] += 1.0
        scores[:, -1] -= 2.0
    return scores.topk(k, dim=-1).indices


class DequantizableStack:
    """A stand-in quantized stack: only ``shape``/``dtype`` and ``dequantize``, like NF4 storage
    (``calls`` counts the dequantizations)."""

    def __init__(self, dense: torch.Tensor):
        self.dense, self.shape, self.dtype, self.calls = dense, dense.shape, dense.dtype, 0

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        self.calls += 1
        return self.dense.to(dtype)


def router(block: torch.nn.Module) -> torch.nn.Module:
    """The router (gate) module of a sparse MoE block."""
    return getattr(block, "gate", None) or block.router


def run_block(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Output, router logits and every gradient (of ``x`` and of each trainable parameter) of
    one forward/backward of a sparse MoE block."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    seen = []
    handle = router(block).register_forward_hook(lambda m, i, o: seen.append(o[0].detach()))
    try:
        y = block(x)
    finally:
        handle.remove()
    y.backward(grad)
    result = {"out": y.detach(), "router_logits": seen[0], "grad_x": x.grad}
    result.update({f"grad_{n}": p.grad for n, p in block.named_parameters() if p.requires_grad})
    return result
