"""The 4-bit loader plugin: NF4/FP4 QLoRA through bitsandbytes (``quantization.method: nf4``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Requirement
from .quantized import QuantizedBasePlugin, load_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from turbotune.config import Config


class BnbQuantPlugin(QuantizedBasePlugin):
    name = "bnb"
    description = "4-bit NF4/FP4 base weights through bitsandbytes (QLoRA), no fp32 upcasting"
    requires = (Requirement("bitsandbytes", "bitsandbytes", extra="bnb"),)
    methods = ("nf4", "fp4")
    label = "4-bit"

    @classmethod
    def serves(cls, cfg: Config) -> bool:
        # FSDP2's low-memory loading quantizes into turbotune's shardable NF4 storage itself;
        # without it, bitsandbytes loads the model and its layers are converted afterwards.
        distributed = getattr(cfg, "distributed", None)
        return not (
            distributed is not None and distributed.enabled and distributed.low_memory_loading
        )

    def load_model(self, path: str, **kwargs: Any) -> PreTrainedModel:
        from dataclasses import replace

        from turbotune.config import ModelConfig
        from turbotune.modeling import load_causal_lm
        from turbotune.quant.bnb import DTYPES, bnb_config

        compute = DTYPES[self.config.compute_dtype]
        kwargs.pop("dtype", None)  # non-quantized modules stay in the compute dtype
        model_cfg = kwargs.pop("model_config", None) or ModelConfig()
        if "device_map" not in kwargs:
            device = load_device(mps=True)
            kwargs["device_map"] = {"": device.index if device.type == "cuda" else device.type}
        quantization = bnb_config(self.config)
        # Blocks added by `turbotune expand` (Llama-Pro) train, so they stay in the compute dtype.
        # Plain module names: every transformers version's matcher takes them as a prefix at a
        # module boundary (some also let "layers.3" keep "layers.30" dense: memory, not results).
        from turbotune.adapters.llama_pro import new_block_modules

        quantization.llm_int8_skip_modules += new_block_modules(path)
        model = load_causal_lm(
            replace(model_cfg, path=path),
            compute,
            quantization_config=quantization,
            **kwargs,
        )
        return self.prepare_loaded(model)

    def describe(self) -> str:
        c = self.config
        return (
            f"{c.method} double_quant={c.double_quant} compute={c.compute_dtype} "
            f"storage={c.quant_storage} upcast_fp32={c.upcast_fp32} skip={c.skip_modules}"
        )
