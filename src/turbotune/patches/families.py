"""The patch table: one row per model family. A new family is one row here.

Each row names, inside the family's transformers module, the RMSNorm classes, the gated MLP
classes (``gate_proj``/``up_proj``/``down_proj`` + activation), the causal-LM head class, the
module-level rotary function that attention calls, and how the family scales its logits.
Classes are matched by name on the model's modules, so a family whose module lacks a class in
an older transformers simply gets fewer patches.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    module: str
    """The transformers module that defines the family (for the module-level rotary function)."""
    causal_lm: str
    """The ``*ForCausalLM`` class (fused linear cross-entropy replaces its forward)."""
    norms: tuple[str, ...] = ()
    """RMSNorm classes (hidden, and per-head q/k norms where the family has them)."""
    mlps: tuple[str, ...] = ()
    """Gated MLP classes: ``down(act(gate(x)) * up(x))``."""
    attentions: tuple[str, ...] = ()
    """Attention classes that call ``rope_fn``: their instances take the fused rotary and, with
    LoRA fusion, compute q, k, v in one fused op (transformers' ``<Family>Attention.forward``
    layout: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``head_dim``, ``scaling``)."""
    activation: str = "silu"
    """The gate activation: ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU)."""
    rope_fn: str | None = "apply_rotary_pos_emb"
    """Module-level rotary function called by attention (``None``: not patched)."""
    norm_offset: float = 0.0
    """``1.0`` for Gemma-style norms that scale by ``1 + w``."""
    norm_eps_attr: str = "variance_epsilon"
    """Attribute of the norm module holding epsilon."""
    logits_divisor_attr: str | None = None
    """Config attribute the logits are divided by (Granite's ``logits_scaling``)."""
    softcap_attr: str | None = None
    """Config attribute of the final logit soft-cap (Gemma 2's ``final_logit_softcapping``)."""
    qk_norm: bool = False
    """Attention normalizes each head of q and k (``q_norm``/``k_norm``) before the rotary."""
    sliding_window: str | None = None
    """Where attention reads the ``sliding_window`` it passes to the attention function:
    ``"config"`` (Mistral), ``"module"`` (Qwen2/3, set per layer type), or None (not passed)."""
    decoder_layers: tuple[str, ...] = ()
    """Pre-norm decoder layers (``residual + attn(input_layernorm(x))``, then
    ``residual + mlp(post_attention_layernorm(.))``, both norms of a class in ``norms``): their
    residual adds are fused with the norms (``add_norm`` kind, ``ops/add_norm.py``)."""
    layer_mlp: str = "mlp"
    """Attribute of the decoder layer holding its MLP or MoE block."""
    residual_multiplier_attr: str | None = None
    """Decoder-layer attribute scaling each branch before its residual add (Granite)."""
    experts: tuple[str, ...] = ()
    """MoE experts classes (transformers 5's stacked ``gate_up_proj``/``down_proj``, called as
    ``experts(hidden, top_k_index, top_k_weights)``): grouped expert kernels of
    :mod:`turbotune.moe` replace their forward; the router is left as it is."""


_T = "transformers.models"


def _row(name: str, prefix: str, *, mlp: bool = True, **extra) -> Family:
    """The row of a family whose classes follow transformers' ``<Prefix><Part>`` naming."""
    return Family(
        module=f"{_T}.{name}.modeling_{name}",
        causal_lm=f"{prefix}ForCausalLM",
        norms=(f"{prefix}RMSNorm",),
        mlps=(f"{prefix}MLP",) if mlp else (),
        attentions=(f"{prefix}Attention",),
        decoder_layers=(f"{prefix}DecoderLayer",),
        **extra,
    )


FAMILIES: dict[str, Family] = {
    "llama": _row("llama", "Llama"),
    "mistral": _row("mistral", "Mistral", sliding_window="config"),
    "mixtral": _row(
        "mixtral", "Mixtral", mlp=False, sliding_window="config", experts=("MixtralExperts",)
    ),
    "qwen2": _row("qwen2", "Qwen2", sliding_window="module"),
    "qwen3": _row("qwen3", "Qwen3", sliding_window="module", qk_norm=True),
    "granite": _row(
        "granite",
        "Granite",
        logits_divisor_attr="logits_scaling",
        residual_multiplier_attr="residual_multiplier",
    ),
    # MoE families: experts through turbotune.moe; Qwen-MoE's shared expert / dense layers are
    # ordinary gated MLPs (``<Prefix>MLP``).
    "qwen2_moe": _row(
        "qwen2_moe", "Qwen2Moe", sliding_window="module", experts=("Qwen2MoeExperts",)
    ),
    "qwen3_moe": _row(
        "qwen3_moe", "Qwen3Moe", sliding_window="module", qk_norm=True, experts=("Qwen3MoeExperts",)
    ),
    "granitemoe": _row(
        "granitemoe",
        "GraniteMoe",
        mlp=False,
        logits_divisor_attr="logits_scaling",
        experts=("GraniteMoeExperts",),
        layer_mlp="block_sparse_moe",
        residual_multiplier_attr="residual_multiplier",
    ),
    # More MoE families, all with transformers 5's stacked experts (5.17 and 5.23). Attention is
    # left out where its forward is not the one the rope/q-k-v patches assume; decoder layers are
    # left out where they are not the plain pre-norm ``x + mlp(norm(x))`` of layers.py.
    # OLMoE: q_norm/k_norm over the whole projection (not per head), clip_qkv.
    "olmoe": Family(
        module=f"{_T}.olmoe.modeling_olmoe",
        causal_lm="OlmoeForCausalLM",
        norms=("OlmoeRMSNorm",),
        decoder_layers=("OlmoeDecoderLayer",),
        experts=("OlmoeExperts",),
        rope_fn=None,
    ),
    # Granite-MoE with a shared MLP (``input_linear``/``output_linear``) added beside the sparse
    # block inside the decoder layer: the fused layer would drop it, so layers stay unpatched.
    "granitemoeshared": Family(
        module=f"{_T}.granitemoeshared.modeling_granitemoeshared",
        causal_lm="GraniteMoeSharedForCausalLM",
        norms=("GraniteMoeSharedRMSNorm",),
        attentions=("GraniteMoeSharedAttention",),
        logits_divisor_attr="logits_scaling",
        experts=("GraniteMoeSharedExperts",),
    ),
    # Ernie 4.5 MoE: interleaved (GLM-style) rotary, which the fused rotary does not compute.
    "ernie4_5_moe": Family(
        module=f"{_T}.ernie4_5_moe.modeling_ernie4_5_moe",
        causal_lm="Ernie4_5_MoeForCausalLM",
        norms=("Ernie4_5_MoeRMSNorm",),
        mlps=("Ernie4_5_MoeMLP",),
        decoder_layers=("Ernie4_5_MoeDecoderLayer",),
        experts=("Ernie4_5_MoeExperts",),
        rope_fn=None,
    ),
    # FlexOlmo: OLMo-2 layers (norms after attention and MLP), q/k norms over the projection.
    "flex_olmo": Family(
        module=f"{_T}.flex_olmo.modeling_flex_olmo",
        causal_lm="FlexOlmoForCausalLM",
        norms=("FlexOlmoRMSNorm",),
        experts=("FlexOlmoExperts",),
        rope_fn=None,
    ),
    # Qwen3-Next: gated attention (q_proj also yields the output gate) with partial rotary, and
    # linear-attention layers; (1 + w) norms with ``eps``. Layers with ``self_attn`` are fused.
    "qwen3_next": Family(
        module=f"{_T}.qwen3_next.modeling_qwen3_next",
        causal_lm="Qwen3NextForCausalLM",
        norms=("Qwen3NextRMSNorm",),
        mlps=("Qwen3NextMLP",),
        decoder_layers=("Qwen3NextDecoderLayer",),
        experts=("Qwen3NextExperts",),
        rope_fn=None,
        norm_offset=1.0,
        norm_eps_attr="eps",
    ),
    # MiniMax: decoder layers scale residual and branch (alpha/beta) after the norm; its
    # lightning-attention layers are not patched, its softmax attention is.
    "minimax": Family(
        module=f"{_T}.minimax.modeling_minimax",
        causal_lm="MiniMaxForCausalLM",
        norms=("MiniMaxRMSNorm",),
        attentions=("MiniMaxAttention",),
        sliding_window="config",
        experts=("MiniMaxExperts",),
    ),
    # PhiMoE: LayerNorms (not RMSNorm), so neither norms nor decoder layers; sparsemixer routing.
    "phimoe": Family(
        module=f"{_T}.phimoe.modeling_phimoe",
        causal_lm="PhimoeForCausalLM",
        attentions=("PhimoeAttention",),
        experts=("PhimoeExperts",),
    ),
    # Families whose routers balance through a score-correction bias, not an auxiliary loss (no
    # ``load_balancing_loss_func``: router logits are returned, no aux loss, as transformers
    # does). DeepSeek-V3 and GLM-4-MoE: multi-head latent / partial-rotary attention, left out.
    "deepseek_v3": Family(
        module=f"{_T}.deepseek_v3.modeling_deepseek_v3",
        causal_lm="DeepseekV3ForCausalLM",
        norms=("DeepseekV3RMSNorm",),
        mlps=("DeepseekV3MLP",),
        decoder_layers=("DeepseekV3DecoderLayer",),
        experts=("DeepseekV3Experts",),
        rope_fn=None,
    ),
    "glm4_moe": Family(
        module=f"{_T}.glm4_moe.modeling_glm4_moe",
        causal_lm="Glm4MoeForCausalLM",
        norms=("Glm4MoeRMSNorm",),
        mlps=("Glm4MoeMLP",),
        decoder_layers=("Glm4MoeDecoderLayer",),
        experts=("Glm4MoeExperts",),
        rope_fn=None,
    ),
    # dots1: Qwen3-style attention (per-head q/k norms), DeepSeek-style routing.
    "dots1": _row(
        "dots1", "Dots1", sliding_window="module", qk_norm=True, experts=("Dots1Experts",)
    ),
    # HunYuan-MoE: q/k norms applied after the rotary, so attention stays unpatched.
    "hunyuan_v1_moe": Family(
        module=f"{_T}.hunyuan_v1_moe.modeling_hunyuan_v1_moe",
        causal_lm="HunYuanMoEV1ForCausalLM",
        norms=("HunYuanMoEV1RMSNorm",),
        mlps=("HunYuanMoEV1MLP",),
        decoder_layers=("HunYuanMoEV1DecoderLayer",),
        experts=("HunYuanMoEV1Experts",),
        rope_fn=None,
    ),
}
