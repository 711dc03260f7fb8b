"""The HQQ loader plugin: ``quantization.method: hqq`` (``train_type: hqq_lora``).

Loads a Hugging Face checkpoint and quantizes its linear layers with turbotune's own HQQ
(``quant/hqq.py``: calibration-free, no ``hqq`` package needed) one at a time on the training
device, keeping the LM head and ``skip_modules`` dense. A local safetensors checkpoint is
streamed (``quant/hqq_load.py``: one tensor in host memory at a time); any other goes through
``from_pretrained`` on the CPU first. Only ``quantization.bits`` and ``group_size`` matter (groups along ``in_features``; the
scales and zero points in bf16). The new blocks of a Llama-Pro expanded checkpoint
(``hqq_llama_pro``) stay dense, since they train. LoRA and DoRA run through turbotune's own
layers (``adapter.implementation: custom``, what ``hqq_lora`` sets) or through peft: peft has no
dispatch for turbotune's ``HQQLinear``, so :meth:`HQQQuantPlugin.prepare_peft` registers peft's plain
LoRA ``Linear`` for it (peft's custom-module hook; that layer only calls its base and reads
``in_features``/``W_q``/``dequantize()``) and spells ``all-linear`` out, since peft's own
expansion counts ``nn.Linear`` only. Both fuse with the ``fused_ops`` plugin.

Under FSDP2 with mixed precision, set ``quantization.quant_storage`` to the gather dtype (the
compute dtype): FSDP2 casts every gathered parameter, and the packed codes must pass as bytes.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch

from turbotune.config import QuantizationConfig
from turbotune.errors import ConfigError

from .quantized import QuantizedBasePlugin, load_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from turbotune.config import Config


class HQQQuantPlugin(QuantizedBasePlugin):
    name = "hqq"
    description = "HQQ 1-8 bit base weights (turbotune's own calibration-free quantizer)"
    methods = ("hqq",)
    label = "HQQ"

    @classmethod
    def check(cls, cfg: Config) -> None:
        q = cfg.quantization
        if not 1 <= q.bits <= 8:
            raise ConfigError(f"{cfg.source}: quantization.bits must be 1..8 for HQQ, got {q.bits}")
        if q.group_size < 1:
            raise ConfigError(f"{cfg.source}: quantization.group_size must be positive")

    def load_model(self, path: str, **kwargs: Any) -> PreTrainedModel:
        from dataclasses import replace

        from turbotune.adapters.llama_pro import new_block_modules
        from turbotune.config import ModelConfig
        from turbotune.modeling import load_causal_lm
        from turbotune.quant.bnb import DTYPES

        compute = DTYPES[self.config.compute_dtype]
        kwargs.pop("dtype", None)  # non-quantized modules stay in the compute dtype
        kwargs.pop("device_map", None)  # loaded on the CPU, quantized onto the device
        model_cfg = kwargs.pop("model_config", None) or ModelConfig()
        device = load_device()
        # Llama-Pro (hqq_llama_pro): the blocks `turbotune expand` added train, so stay dense.
        extra_skip = tuple(new_block_modules(path))
        model = None
        if not kwargs and not (model_cfg.gguf_file or model_cfg.trust_remote_code):
            model = self.stream(path, device, model_cfg.attn_implementation, extra_skip)
        if model is None:  # a checkpoint only from_pretrained reads: whole on the CPU first
            model = load_causal_lm(replace(model_cfg, path=path), compute, **kwargs)
            self.quantize(model, device, progress=True, extra_skip=extra_skip)
            model.to(device)
        return self.prepare_loaded(model)

    def stream(
        self, path: str, device: torch.device, attn_implementation: str, extra_skip: tuple[str, ...]
    ) -> PreTrainedModel | None:
        """Quantize while reading the checkpoint (``quant/hqq_load.py``), or ``None``."""
        from turbotune.quant.bnb import DTYPES
        from turbotune.quant.hqq_linear import HQQLinear
        from turbotune.quant.hqq_load import stream_hqq_checkpoint

        c = self.config
        compute = DTYPES[c.compute_dtype]

        def make_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> HQQLinear:
            holder = types.SimpleNamespace(weight=weight, bias=bias)
            return HQQLinear.from_linear(
                holder, c.bits, c.group_size, compute_dtype=compute,
                storage_dtype=DTYPES[c.quant_storage],
            )  # fmt: skip

        return stream_hqq_checkpoint(
            path, compute_dtype=compute, device=device, make_layer=make_layer,
            skip_modules=_skipped(c) + extra_skip, attn_implementation=attn_implementation,
            progress=True,
        )  # fmt: skip

    def quantize(
        self,
        model: torch.nn.Module,
        device: torch.device,
        *,
        progress: bool = False,
        extra_skip: tuple[str, ...] = (),
    ) -> int:
        """Swap ``model``'s linears (not the head, ``skip_modules`` or ``extra_skip``) for
        ``HQQLinear`` on ``device``."""
        from turbotune.quant.bnb import DTYPES
        from turbotune.quant.hqq_linear import quantize_linears

        c = self.config
        return quantize_linears(
            model, bits=c.bits, group_size=c.group_size, device=device,
            compute_dtype=DTYPES[c.compute_dtype], skip_modules=_skipped(c) + extra_skip,
            storage_dtype=DTYPES[c.quant_storage], progress=progress,
        )  # fmt: skip

    def prepare_peft(self, model: PreTrainedModel, peft_config: Any) -> None:
        if type(peft_config).__name__ == "LoraConfig":  # the adapter plugin's peft path
            teach_peft(model, peft_config)

    def describe(self) -> str:
        c = self.config
        return (
            f"hqq bits={c.bits} group_size={c.group_size} compute={c.compute_dtype} "
            f"storage={c.quant_storage} skip={list(_skipped(c))}"
        )


def teach_peft(model: torch.nn.Module, config: Any) -> None:
    """Let peft's ``get_peft_model`` wrap ``model``'s ``HQQLinear`` layers, in place on ``config``.

    Registers peft's LoRA ``Linear`` as the layer for ``HQQLinear`` (peft >= 0.14's
    ``LoraConfig._register_custom_module``) and replaces ``target_modules="all-linear"`` by the
    last name components of every ``nn.Linear``/``HQQLinear`` but the output layer.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from turbotune.quant.hqq_linear import HQQLinear

    config._register_custom_module({HQQLinear: PeftLoraLinear})
    if config.target_modules != "all-linear":
        return
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config.target_modules = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, HQQLinear)) and module is not head
        }
    )


def _skipped(c: QuantizationConfig) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*c.skip_modules, "lm_head"]))
