"""The padding-free plugin: batches are one row of concatenated sequences, nothing padded.

It brings two things: the collator (:class:`turbotune.data.padding_free.PaddingFreeCollator`,
through the ``data_collator`` hook) and the attention that keeps each sequence to itself
(:func:`turbotune.attention.use_varlen_attention`, in ``augment``). A model on
``flash_attention_2``/``3`` keeps it (transformers' flash path reads the same boundaries).
It composes with the quantized loaders, the adapters and ``fused_ops``: the fused attention
forward passes the boundary keywords on, and the fused rotary reads each token's own position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments


@dataclass
class PaddingFreeConfig:
    attention_backend: Literal["auto", "flash_attn", "varlen", "flex", "sdpa_loop"] = "auto"
    """Kernel of the packed attention: ``auto`` takes flash-attn when installed, else PyTorch's
    ``varlen_attn`` (CUDA, bf16/fp16), else FlexAttention (CUDA), else the exact per-sequence
    SDPA loop (CPU, fp32)."""


class PaddingFreePlugin(Plugin):
    name = "padding_free"
    description = "padding-free batches: one packed row, per-sequence positions, varlen attention"
    config_cls = PaddingFreeConfig
    order = 90  # before fused_ops (100): its attention forward reads the implementation per call

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        from turbotune.attention import use_varlen_attention

        self.implementation = use_varlen_attention(model, self.config.attention_backend)
        return model, training_args

    def data_collator(self, tokenizer: Any, training_args: TrainingArguments | None) -> Any:
        from turbotune.data.padding_free import PaddingFreeCollator

        return PaddingFreeCollator()

    def describe(self) -> str:
        return f"attention backend: {self.config.attention_backend}"
