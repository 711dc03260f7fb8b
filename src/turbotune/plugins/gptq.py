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

from typing import TYPE_CHECKING, Any

import torch

from turbotune.errors import ConfigError

from .quantized import QuantizedBasePlugin, load_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
        device = _device_of(kwargs.get("device_map"))
        model = load_gptq_model(path, dtype=DTYPES[self.config.compute_dtype], device=device)
        return self.prepare_loaded(model)

    def prepare_peft(self, model: PreTrainedModel, peft_config: Any) -> None:
        if hasattr(peft_config, "_register_custom_module"):  # peft's LoraConfig
            prepare_peft_config(model, peft_config)

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


def _device_of(device_map: Any) -> torch.device:
    """The device a ``{"": where}`` device map names, else :func:`load_device`'s choice."""
    if isinstance(device_map, dict) and "" in device_map:
        where = device_map[""]
        return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
    return load_device()
