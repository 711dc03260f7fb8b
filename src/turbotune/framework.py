"""``AccelerationFramework``: turbotune for people who keep their own Trainer script.

::

    fw = AccelerationFramework("accel.yaml")            # or a dict, or $TURBOTUNE_CONFIG
    model, peft_config = fw.load_model("/models/llama", dtype=torch.bfloat16)
    model, args = fw.augment(model, training_args, peft_config)
    trainer = Trainer(model=model, args=args, callbacks=fw.callbacks(model), ...)

The framework picks the active plugins from the config (see :mod:`turbotune.plugins`), checks
their packages, prints a banner, and calls their hooks in order. ``turbotune train`` is built on
the same object, so a script and the CLI run the same code.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from turbotune import __version__
from turbotune.config import Config, load_config
from turbotune.errors import TurbotuneError
from turbotune.plugins import Plugin, activate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

logger = logging.getLogger("turbotune")

CONFIG_ENV = "TURBOTUNE_CONFIG"


class AccelerationFramework:
    """The active plugins of one configuration, and the hooks that apply them."""

    def __init__(
        self,
        config: str | os.PathLike | dict[str, Any] | Config | None = None,
        overrides: list[str] | None = None,
        *,
        banner: bool = True,
    ):
        if config is None:
            config = os.environ.get(CONFIG_ENV)
            if config is None:
                raise TurbotuneError(
                    f"no configuration: pass a path or dict, or set {CONFIG_ENV}=path/to/config.yaml"
                )
        self.config = config if isinstance(config, Config) else load_config(config, overrides)
        self.plugins: list[Plugin] = activate(self.config)
        if banner:
            self.print_banner()

    # --- introspection ----------------------------------------------------------------------

    @property
    def loader(self) -> Plugin | None:
        return next((p for p in self.plugins if p.loads_model), None)

    def plugin(self, name: str) -> Plugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def banner_lines(self) -> list[str]:
        lines = [f"turbotune {__version__} - active plugins:"]
        for p in self.plugins:
            versions = ", ".join(f"{r.pip} {r.version()}" for r in p.requires)
            detail = p.describe()
            lines.append(
                f"  {p.name:<14} {type(p).__module__}"
                + (f" [{versions}]" if versions else "")
                + (f" - {detail}" if detail else "")
            )
        return lines

    def print_banner(self) -> None:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            "\n".join(self.banner_lines()), style="bold cyan", markup=False
        )

    # --- hooks ------------------------------------------------------------------------------

    def load_model(self, path: str | None = None, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
        """Load the model (through the loader plugin if one is active) and the adapter config.

        Args:
            path: model id or directory; defaults to ``model.path`` of the config.
            **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

        Returns:
            ``(model, peft_config)``; ``peft_config`` is ``None`` for full fine-tuning.
        """
        path = path or self.config.model.path
        if path is None:
            raise TurbotuneError("no model path: pass one to load_model() or set model.path")
        if "torch_dtype" in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        loader = self.loader
        if loader is not None:
            model = loader.load_model(path, **kwargs)
        else:
            from dataclasses import replace

            from turbotune.modeling import load_causal_lm

            dtype = kwargs.pop("dtype", torch.float32)
            model = load_causal_lm(replace(self.config.model, path=path), dtype, **kwargs)
        for p in self.plugins:
            p.check_model(model)
        return model, self.peft_config()

    def peft_config(self) -> Any:
        adapter = self.plugin("adapter")
        return adapter.peft_config() if adapter is not None else None

    def augment(
        self,
        model: PreTrainedModel,
        training_args: TrainingArguments | None = None,
        peft_config: Any = None,
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        """Apply every active plugin's augmentation, in order (adapters before patches).

        The model is prepared for training: its forwards build no KV cache (transformers would
        fill a DynamicCache every step: memory for nothing, and the layers could not be
        replayed as CUDA graphs); ``generate`` still asks for one explicitly.
        """
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        for p in self.plugins:
            p.check_model(model)
            model, training_args = p.augment(model, training_args, peft_config)
        return model, training_args

    def callbacks(self, model: PreTrainedModel | None = None) -> list[TrainerCallback]:
        """The Trainer callbacks of the active plugins."""
        out: list[TrainerCallback] = []
        for p in self.plugins:
            out.extend(p.callbacks(model))
        return out

    def data_collator(self, tokenizer: Any, training_args: TrainingArguments | None = None) -> Any:
        """The collator a plugin provides (padding-free batches...), or ``None``: the caller's
        default (``turbotune train`` pads)."""
        return self._one("data_collator", tokenizer, training_args)

    def train_batch_sampler(
        self, dataset: Any, training_args: TrainingArguments | None = None
    ) -> Any:
        """The training batch sampler a plugin provides (multipack...), or ``None``."""
        return self._one("train_batch_sampler", dataset, training_args)

    def _one(self, hook: str, *args: Any) -> Any:
        """The result of the one plugin whose ``hook`` returns something (two: an error)."""
        found = [(p.name, r) for p in self.plugins if (r := getattr(p, hook)(*args)) is not None]
        if len(found) > 1:
            raise TurbotuneError(
                f"plugins {[name for name, _ in found]} all provide a {hook}; enable only one"
            )
        return found[0][1] if found else None
