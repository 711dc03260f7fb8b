"""The shared shape of the loader plugins that quantize the frozen base (bnb, GPTQ, HQQ).

Each owns some values of ``quantization.method``, loads the model itself (``loads_model``) early
(``order = 10``, before the adapter), and refuses full fine-tuning of quantized weights. A new
format declares its ``methods`` and a ``label`` for messages, adds its own checks in
:meth:`check`, writes ``load_model`` (placing the model on :func:`load_device`), and may teach
peft its layer type in :meth:`prepare_peft`. :meth:`prepare_loaded` (freeze the base) also
serves the benchmark, which builds its models itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from turbotune.config import QuantizationConfig
from turbotune.errors import ConfigError

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments

    from turbotune.config import Config


def load_device(mps: bool = False) -> torch.device:
    """Where a loader puts the model: this process's GPU (``LOCAL_RANK``), else MPS when the
    format runs there (``mps``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if mps and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class QuantizedBasePlugin(Plugin):
    """Base class of plugins that load a model whose frozen base weights are quantized."""

    config_cls = QuantizationConfig
    section = "quantization"
    order = 10
    loads_model = True
    methods: ClassVar[tuple[str, ...]] = ()
    """The ``quantization.method`` values this plugin serves."""
    label: ClassVar[str] = ""
    """How messages name the weights (``"4-bit"``, ``"GPTQ"``)."""

    @classmethod
    def section_of(cls, cfg: Config) -> QuantizationConfig | None:
        q = cfg.quantization
        if q.method not in cls.methods or not cls.serves(cfg):
            return None
        if cfg.adapter.method == "full":
            raise ConfigError(
                f"{cfg.source}: {cls.label} weights cannot be trained in full; use "
                "adapter.method lora (QLoRA) or quantization.method none"
            )
        cls.check(cfg)
        return q

    @classmethod
    def serves(cls, cfg: Config) -> bool:
        """Whether this plugin loads the run at all (another path may quantize it instead)."""
        return True

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Format-specific checks of the section; raise :class:`ConfigError`."""

    def prepare_loaded(self, model: PreTrainedModel) -> PreTrainedModel:
        """The post-load step (frozen base, optional fp32 upcast), also for bench-built models."""
        from turbotune.quant.bnb import prepare_for_training

        return prepare_for_training(model, upcast_fp32=self.config.upcast_fp32)

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        # Frozen quantized inputs: checkpointed blocks need an input that requires grad.
        if training_args is not None and getattr(training_args, "gradient_checkpointing", False):
            model.enable_input_require_grads()
        if peft_config is not None:
            self.prepare_peft(model, peft_config)
        return model, training_args

    def prepare_peft(self, model: PreTrainedModel, peft_config: Any) -> None:
        """Let peft wrap this format's layers (peft only knows the formats it ships)."""
