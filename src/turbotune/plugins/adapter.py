"""The adapter plugin: turns the ``adapter`` section (or a user's peft config) into adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from turbotune.config import AdapterConfig

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments


class AdapterPlugin(Plugin):
    name = "adapter"
    description = (
        "LoRA / DoRA adapters through peft or turbotune's own LoRA layers (or full fine-tuning)"
    )
    config_cls = AdapterConfig
    section = "adapter"
    order = 50

    def peft_config(self) -> Any:
        """The peft config of the section, or ``None`` for full fine-tuning and Llama-Pro."""
        if self.config.method in ("full", "llama_pro"):
            return None
        if self.config.implementation == "custom":
            from turbotune.adapters.lora import check_supported

            check_supported(self.config)  # fail before the model is loaded
        from turbotune.adapters.peft_lora import lora_config

        return lora_config(self.config)

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        from peft import PeftModel

        from turbotune.adapters.peft_lora import apply_lora, compute_dtype_of

        if isinstance(model, PeftModel):
            return model, training_args
        if self.config.method == "llama_pro":  # only the blocks `turbotune expand` added train
            from turbotune.adapters.llama_pro import apply_llama_pro, is_llama_pro_model

            if not is_llama_pro_model(model):
                apply_llama_pro(model)
            if training_args is not None and training_args.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: see below
            return model, training_args
        if peft_config is None:
            peft_config = self.peft_config()
        if peft_config is None:  # full fine-tuning: everything trains
            for param in model.parameters():
                if param.is_floating_point():
                    param.requires_grad_(True)
            return model, training_args
        checkpointing = bool(training_args is not None and training_args.gradient_checkpointing)
        if checkpointing:
            # Frozen embeddings give checkpointed blocks inputs without grad; the reentrant
            # variant would then drop every adapter gradient.
            model.enable_input_require_grads()
        if self.config.implementation == "custom":
            from turbotune.adapters.lora import apply_custom_lora, is_custom_lora_model

            if is_custom_lora_model(model):
                return model, training_args
            # Built from the section; peft_config (its LoraConfig equivalent) is what gets saved.
            return apply_custom_lora(model, self.config), training_args
        dtype = compute_dtype_of(model) if self.config.weights_dtype == "compute" else None
        return apply_lora(model, peft_config, adapter_dtype=dtype), training_args

    def describe(self) -> str:
        c = self.config
        if c.method == "full":
            return "full fine-tuning"
        if c.method == "llama_pro":
            return "llama_pro: only the blocks added by `turbotune expand` train"
        kind = f"{c.method} (custom)" if c.implementation == "custom" else c.method
        text = f"{kind} r={c.r} alpha={c.alpha:g} dropout={c.dropout:g} targets={c.target_modules}"
        return text + (f" parameters={c.target_parameters}" if c.target_parameters else "")
