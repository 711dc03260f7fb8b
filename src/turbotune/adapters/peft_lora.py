"""LoRA through peft: the config translation and the application to a model.

The adapter section maps one-to-one onto ``peft.LoraConfig``; adapters saved this way load
with ``peft.PeftModel.from_pretrained`` because they *are* peft adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from turbotune.config import AdapterConfig


def lora_config(cfg: AdapterConfig) -> LoraConfig:
    """The ``peft.LoraConfig`` equivalent of an adapter section."""
    from peft import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        target_parameters=list(cfg.target_parameters) or None,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.method == "dora",
        modules_to_save=list(cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(
    model: torch.nn.Module, config: LoraConfig, *, adapter_dtype: torch.dtype | None = None
) -> PeftModel:
    """Wrap ``model`` with peft LoRA layers; adapters in fp32 unless ``adapter_dtype`` says otherwise.

    Args:
        model: a transformers causal LM (frozen base; quantized or not).
        config: the peft config.
        adapter_dtype: dtype of the LoRA weights; ``None`` keeps peft's default (fp32).
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if adapter_dtype is not None:
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" in name:
                param.data = param.data.to(adapter_dtype)
    return peft_model


def compute_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype activations flow in: the first floating non-adapter parameter's dtype."""
    quant = getattr(model, "hf_quantizer", None)
    if quant is not None:
        dtype = getattr(quant.quantization_config, "bnb_4bit_compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    for name, param in model.named_parameters():
        if param.is_floating_point() and "lora_" not in name:
            return param.dtype
    return torch.float32
