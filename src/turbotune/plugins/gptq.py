"""The GPTQ loader plugin: LoRA on a GPTQ checkpoint (``quantization.method: gptq``).

The model path must be a GPTQ checkpoint in the standard layout (``turbotune quantize gptq``
writes one; AutoGPTQ / GPTQModel ``checkpoint_format: gptq`` checkpoints load too). Its linears
become :class:`turbotune.quant.gptq_linear.GPTQLinear` (Triton dequantize-and-multiply on a GPU,
eager on a CPU); nothing from optimum or gptqmodel is needed. Bits and group size come from the
checkpoint, not from this section. Adapters come from the adapter plugin as for NF4: peft's LoRA
``Linear`` wraps GPTQLinear (registered here on the run's ``LoraConfig``), and
``adapter.implementation: custom`` takes GPTQLinear bases directly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from turbotune.errors import ConfigError

from .quantized import QuantizedBasePlugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments


class GPTQPlugin(QuantizedBasePlugin):
    name = "gptq"
    description = "GPTQ checkpoints (standard layout) as frozen LoRA bases, Triton GPTQ kernels"
    methods = ("gptq",)
    label = "GPTQ"

    def load_model(self, path: str, **kwargs: Any) -> PreTrainedModel:
        from turbotune.quant.bnb import DTYPES
        from turbotune.quant.gptq_checkpoint import load_gptq_model, read_gptq_config

        if read_gptq_config(path) is None:
            raise ConfigError(
                f"quantization.method gptq needs a GPTQ checkpoint, and '{path}' is not one "
                "(no quantization_config with quant_method gptq in config.json); make one with "
                "`turbotune quantize gptq MODEL --out DIR`"
            )
        device = _device(kwargs.get("device_map"))
        model = load_gptq_model(path, dtype=DTYPES[self.config.compute_dtype], device=device)
        return self.prepare_loaded(model)

    def prepare_loaded(self, model: PreTrainedModel) -> PreTrainedModel:
        """The post-load step (frozen base, optional upcast): also for bench-built models."""
        from turbotune.quant.bnb import prepare_for_training

        return prepare_for_training(model, upcast_fp32=self.config.upcast_fp32)

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        if training_args is not None and getattr(training_args, "gradient_checkpointing", False):
            model.enable_input_require_grads()
        if peft_config is not None and hasattr(peft_config, "_register_custom_module"):
            prepare_peft_config(model, peft_config)
        return model, training_args

    def describe(self) -> str:
        c = self.config
        return f"gptq (from the checkpoint) compute={c.compute_dtype} upcast_fp32={c.upcast_fp32}"


def prepare_peft_config(model: torch.nn.Module, peft_config: Any) -> Any:
    """Make a peft ``LoraConfig`` adapt the GPTQLinear layers of ``model``, in place.

    peft's ``all-linear`` only matches ``nn.Linear``: it is resolved here to the module names
    (GPTQLinear and any dense linear but the output layer), as peft saves it resolved anyway.
    """
    from turbotune.adapters.lora import resolve_targets
    from turbotune.quant.gptq_linear import register_with_peft

    register_with_peft(peft_config)
    targets = peft_config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        names = resolve_targets(model, "all-linear")
        peft_config.target_modules = {n.rsplit(".", 1)[-1] for n in names}
    return peft_config


def _device(device_map: Any) -> str:
    if isinstance(device_map, dict) and "" in device_map:
        where = device_map[""]
        return f"cuda:{where}" if isinstance(where, int) else str(where)
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"
