"""FLOPs per token of a causal LM, and GPU peaks to turn them into MFU.

Counting convention (PaLM appendix B; Chinchilla's "6N"), one multiply-add = 2 FLOPs, matrix
products only (norms, activations, softmax and the embedding lookup are left out):

- ``N`` = matmul parameters one token passes through: attention projections, the MLP (for an
  MoE layer, the router and the ``top_k`` routed experts plus any shared expert), the LM head
  (counted even when tied: it is still a product). Embeddings are lookups, not products.
- A linear layer costs ``2N`` forward, ``2N`` for the input gradient, ``2N`` for the weight
  gradient. Full training: ``6N``. LoRA: frozen weights get no weight gradient, so ``4N``, plus
  ``6`` per adapter parameter.
- Attention scores, per layer per token, forward: ``QK^T`` and ``PV`` are each ``2 L d`` with
  ``d = num_attention_heads * head_dim`` and ``L`` the context; causal attention sees ``L/2`` keys
  on average, so forward ``= 2 L d`` (``4 L d`` non-causal). Backward is twice the forward.
- Gradient checkpointing (Hugging Face checkpoints each decoder layer) recomputes the layers'
  forward once more: ``2 (N - N_head)`` plus the attention forward, plus the adapters' forward.
  Leave it out for MFU in PaLM's sense (useful work only); count it for hardware utilization.

Full causal attention is assumed: sliding windows make the attention term an overestimate, and
multi-head latent attention (DeepSeek) is not modelled. For batches of mixed lengths pass the
effective length ``sum(L_i^2) / sum(L_i)`` as ``seq_len``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = [
    "PEAK_BF16_FLOPS",
    "attention_flops_per_token",
    "count_lora_params",
    "forward_flops_per_token",
    "linear_params",
    "lm_head_params",
    "peak_flops",
    "train_flops_per_token",
]

# MLPs with two matrices (up, down) instead of the gated three (gate, up, down).
_UNGATED_MLP = frozenset(
    {"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "bloom", "gpt_bigcode", "starcoder2"}
)


def _text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _attention_dims(c: Any) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) of a config."""
    if getattr(c, "kv_lora_rank", None):
        raise ValueError(f"multi-head latent attention ({c.model_type}) is not modelled")
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, kv, head_dim


def _num_experts(c: Any) -> int:
    return getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 0


def _is_moe_layer(c: Any, layer: int) -> bool:
    """Which layers route to experts (Qwen-MoE's sparse step and dense list, DeepSeek's prefix)."""
    if _num_experts(c) == 0:
        return False
    if layer in (getattr(c, "mlp_only_layers", None) or []):
        return False
    if layer < (getattr(c, "first_k_dense_replace", None) or 0):
        return False
    step = getattr(c, "decoder_sparse_step", None) or 1
    return (layer + 1) % step == 0


def _mlp_params(c: Any, layer: int) -> int:
    hidden = c.hidden_size
    mats = 2 if getattr(c, "model_type", "") in _UNGATED_MLP else 3
    if not _is_moe_layer(c, layer):
        inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
        return mats * hidden * inter
    experts = _num_experts(c)
    top_k = getattr(c, "num_experts_per_tok", None) or getattr(c, "top_k", None) or 1
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    params = hidden * experts + top_k * mats * hidden * inter  # router + active experts
    shared = getattr(c, "shared_expert_intermediate_size", None)  # Qwen2-MoE: gated shared MLP
    if shared:
        params += mats * hidden * shared + hidden  # + its 1-output sigmoid gate
    shared = getattr(c, "shared_intermediate_size", None)  # GraniteMoE-shared
    if shared:
        params += mats * hidden * shared
    n_shared = getattr(c, "n_shared_experts", None)  # DeepSeek-style
    if n_shared:
        params += n_shared * mats * hidden * inter
    return params


def lm_head_params(config: Any) -> int:
    """Parameters of the output projection, ``hidden_size * vocab_size``."""
    c = _text_config(config)
    return c.hidden_size * c.vocab_size


def linear_params(config: Any) -> int:
    """``N``: matmul parameters each token passes through (MoE: active experts only).

    Args:
        config: a Hugging Face ``PretrainedConfig`` of a decoder-only LM.
    """
    c = _text_config(config)
    heads, kv, head_dim = _attention_dims(c)
    attn = 2 * c.hidden_size * heads * head_dim + 2 * c.hidden_size * kv * head_dim  # q, o; k, v
    layers = sum(attn + _mlp_params(c, i) for i in range(c.num_hidden_layers))
    return layers + lm_head_params(c)


def attention_flops_per_token(config: Any, seq_len: float, *, causal: bool = True) -> float:
    """Forward FLOPs of the attention scores (``QK^T`` and ``PV``) per token, all layers.

    Args:
        config: the model's Hugging Face config.
        seq_len: tokens per sequence (or the effective length of a mixed batch).
        causal: halve the context (each token attends to ``L/2`` keys on average).
    """
    c = _text_config(config)
    heads, _, head_dim = _attention_dims(c)
    per_layer = 4.0 * seq_len * heads * head_dim
    return c.num_hidden_layers * per_layer * (0.5 if causal else 1.0)


def forward_flops_per_token(config: Any, seq_len: float, *, causal: bool = True) -> float:
    """Forward FLOPs per token: ``2N`` plus the attention scores."""
    return 2.0 * linear_params(config) + attention_flops_per_token(config, seq_len, causal=causal)


def train_flops_per_token(
    config: Any,
    seq_len: float,
    *,
    trainable: Literal["full", "lora"] = "full",
    lora_params: int = 0,
    checkpointing: bool = False,
    causal: bool = True,
) -> float:
    """FLOPs of one training step (forward + backward) per token.

    Args:
        config: the model's Hugging Face config.
        seq_len: tokens per sequence (or the effective length of a mixed batch).
        trainable: ``full`` (every weight gets a gradient: ``6N``) or ``lora`` (frozen base:
            ``4N`` + ``6 * lora_params``).
        lora_params: trainable adapter parameters (LoRA A and B); see :func:`count_lora_params`.
        checkpointing: add the decoder layers' recomputed forward (hardware FLOPs).
        causal: causal attention (half the score matrix is needed).

    Returns:
        FLOPs per (non-padding) token.
    """
    n = linear_params(config)
    attn = attention_flops_per_token(config, seq_len, causal=causal)
    if trainable == "full":
        total = 6.0 * n + 3.0 * attn
    elif trainable == "lora":
        total = 4.0 * n + 6.0 * lora_params + 3.0 * attn
    else:
        raise ValueError(f"trainable must be 'full' or 'lora', got {trainable!r}")
    if checkpointing:
        total += 2.0 * (n - lm_head_params(config)) + 2.0 * lora_params + attn
    return total


def count_lora_params(model: torch.nn.Module) -> int:
    """Trainable adapter matrices of a model (peft or turbotune LoRA: names with ``lora_``).

    DoRA's magnitude vectors are elementwise, not products, and are not counted.
    """
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and p.ndim >= 2 and "lora_" in name
    )


#: Dense bf16 tensor-core peak FLOP/s from the vendors' data sheets, by a substring of the
#: device name (lower case); the first match wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("mi300x", 1307e12),
)

#: bf16 matrix-product rate measured on the project's machines (about 790 TFLOP/s on H100 and
#: H200 SXM; see the GPU notes). MFU is reported against it, so that 100% is reachable.
_MEASURED_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 0.0),  # not measured: fall back to the data sheet
    ("h100 nvl", 0.0),
    ("h200 nvl", 0.0),
    ("h100", 790e12),
    ("h200", 790e12),
)


def _lookup(name: str, table: tuple[tuple[str, float], ...]) -> float | None:
    low = name.lower()
    for key, value in table:
        if key in low:
            return value or None
    return None


def _device_name(device: str | int | torch.device | None) -> str | None:
    """A GPU's marketing name, or ``None`` for devices without a table entry (CPU, MPS)."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device  # not a device string: a GPU name such as "NVIDIA H100 80GB HBM3"
    if isinstance(device, int):
        device = torch.device("cuda", device)
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def peak_flops(
    device: str | int | torch.device | None = None, *, measured: bool = False
) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU, or ``None`` when unknown (CPU, MPS, unlisted GPU).

    Args:
        device: a GPU name (``"NVIDIA H100 80GB HBM3"``), a torch device, a CUDA index, or
            ``None`` for the current CUDA device.
        measured: the rate measured on the project's machines (790e12 on H100/H200 SXM) instead
            of the data sheet; GPUs never measured fall back to the data sheet.
    """
    name = _device_name(device)
    if name is None:
        return None
    if measured:
        value = _lookup(name, _MEASURED_BF16_FLOPS)
        if value is not None:
            return value
    return _lookup(name, PEAK_BF16_FLOPS)
