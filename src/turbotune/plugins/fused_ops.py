"""The fused-ops plugin: Triton kernels and LoRA-fused projections patched into the model.

Every kernel family can be switched off on its own. The patches go on after the adapters (the
LoRA-fused ops read peft's LoRA layers), adapters keep peft's format, and gradient
checkpointing works unchanged because only module forwards are replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from turbotune.patches.families import FAMILIES

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments


@dataclass
class FusedOpsConfig:
    rms_norm: bool = True
    """Triton RMSNorm (forward and backward, weight gradient included)."""
    add_norm: bool = True
    """Each decoder layer's residual adds fused into the RMSNorms after them, forward and backward
    (``ops/add_norm.py``); needs ``rms_norm`` (ignored without it)."""
    rope: bool = True
    """Triton rotary embedding that honours per-sequence positions."""
    swiglu: bool = True
    """Fused gated-MLP activation (SwiGLU / GeGLU)."""
    cross_entropy: bool = True
    """LM head fused with a chunked cross-entropy: the full logits never exist."""
    lora: bool = True
    """LoRA-fused projections with hand-written backward (dequantizing 4-bit bases on the fly);
    with ``swiglu`` the whole gate/up/down MLP is one op."""
    moe: bool = True
    """MoE experts (Mixtral, Qwen2/3-MoE, Granite-MoE) as grouped products over tokens sorted by
    expert, no loop over experts; routers, router logits and the auxiliary loss unchanged."""
    moe_backend: Literal["auto", "triton", "grouped_mm", "mm_loop", "loop"] = "auto"
    """Expert kernels: ``mm_loop`` (one cuBLAS product per expert; ``auto`` for at most 16
    experts with at least 1024 rows each, outside CUDA graphs), ``grouped_mm``
    (``torch._grouped_mm``; ``auto`` on sm90+ bf16), ``triton`` (gather/scatter grouped GEMMs;
    ``auto`` elsewhere on CUDA), ``loop`` (``auto`` on CPU)."""
    moe_quantize_experts: bool = True
    """With a 4-bit (bitsandbytes) model, quantize the frozen stacked experts to NF4 as well:
    transformers 5 leaves them dense (it only quantizes ``nn.Linear``)."""
    cuda_graphs: bool = True
    """Replay each decoder layer's forward and backward as CUDA graphs once a batch shape
    repeats (``ops/graphs.py``): the host's launch work per step drops from hundreds of ms to a
    few. Layers with dropout, checkpointing, FSDP hooks or new shapes run eagerly."""


class FusedOpsPlugin(Plugin):
    name = "fused_ops"
    description = "Triton RMSNorm, RoPE, SwiGLU, fused linear cross-entropy, LoRA-fused projections"
    config_cls = FusedOpsConfig
    model_types = tuple(FAMILIES)
    order = 100

    def kinds(self) -> list[str]:
        c = self.config
        kinds = ("rms_norm", "rope", "swiglu", "cross_entropy", "lora", "moe", "add_norm")
        return [k for k in kinds if getattr(c, k) and (k != "add_norm" or c.rms_norm)]

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        from turbotune.patches import apply_patches

        if self.config.moe and self.config.moe_quantize_experts and _moe_in_4bit(model):
            from turbotune.moe.quant import quantize_experts

            quantize_experts(model)
        patches = apply_patches(model, self.kinds(), moe_backend=self.config.moe_backend)
        model.__dict__["_turbotune_patches"] = patches
        self.patches = patches
        if self.config.moe and "moe" in patches.counts:
            # peft's target_parameters wrappers set up and tear down a parametrization on every
            # forward (~1.5 ms of host time per layer): the patched experts read the factors.
            from turbotune.moe.peft_experts import reroute_expert_lora

            reroute_expert_lora(model)
        self.graphs = _install_graphs(model) if self.config.cuda_graphs else None
        return model, training_args

    def describe(self) -> str:
        text = "kernels: " + ", ".join(self.kinds())
        graphs = getattr(self, "graphs", None)
        if graphs is not None:
            text += "; CUDA graphs " + (f"off ({graphs.disabled})" if graphs.disabled else "on")
        return text


def _install_graphs(model: PreTrainedModel) -> Any:
    """Per-layer CUDA graphs (:class:`~turbotune.ops.graphs.LayerGraphs`) where CUDA exists."""
    import torch

    if not torch.cuda.is_available():
        return None
    from turbotune.distributed.shard import decoder_blocks
    from turbotune.ops.graphs import LayerGraphs

    graphs = LayerGraphs(decoder_blocks(model))
    model.__dict__["_turbotune_graphs"] = graphs
    return graphs


def _moe_in_4bit(model: PreTrainedModel) -> bool:
    """An MoE model whose linears are bitsandbytes 4-bit (checked by class name: bitsandbytes
    need not be installed when the model is not quantized)."""
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None or not family.experts:
        return False
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules()
    )
