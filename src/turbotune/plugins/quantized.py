"""The shared shape of the loader plugins that quantize the frozen base (bnb, GPTQ, HQQ).

Each owns some values of ``quantization.method``, loads the model itself (``loads_model``) early
(``order = 10``, before the adapter), and refuses full fine-tuning of quantized weights. A new
format declares its ``methods`` and a ``label`` for messages, adds its own checks in
:meth:`check`, and writes ``load_model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from turbotune.config import QuantizationConfig
from turbotune.errors import ConfigError

from .base import Plugin

if TYPE_CHECKING:
    from turbotune.config import Config


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
