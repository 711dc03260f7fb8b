"""The plugin protocol: what a plugin declares and the hooks it may implement.

Design note (after torchtitan's model converters). A plugin is a class with a few declarations
(name, config section, packages, supported model types, order) and these hooks:

* ``load_model`` — build the model (only loader plugins, e.g. 4-bit quantization; one at most);
* ``augment`` — change the model and training arguments (adapters, fused ops, attention);
* ``callbacks`` — ``transformers.TrainerCallback`` objects to add to the Trainer;
* ``data_collator`` / ``train_batch_sampler`` — how batches are formed (at most one plugin each).

The framework instantiates active plugins with *their own* section only, sorts them by
``order`` and calls the hooks in that order. Plugins never contain kernels: they import from
``turbotune.ops``/``turbotune.patches`` inside their hooks, so listing plugins stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from turbotune.errors import MissingPackageError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

    from turbotune.config import Config


@dataclass(frozen=True)
class Requirement:
    """A package a plugin needs: its import name, the pip spec, and the turbotune extra."""

    module: str
    pip: str
    extra: str | None = None

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def install_command(self) -> str:
        if self.extra:
            return f"pip install 'turbotune[{self.extra}]'"
        return f"pip install '{self.pip}'"

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.pip.split("[")[0].split(">")[0].split("=")[0])
        except importlib.metadata.PackageNotFoundError:
            return None


@dataclass
class NoOptions:
    """A plugin without options."""


class Plugin:
    """Base class of turbotune plugins. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    """Unique short name; also the key of its section under ``plugins:``."""
    description: ClassVar[str] = ""
    """One line for ``turbotune plugins``."""
    config_cls: ClassVar[type] = NoOptions
    """The dataclass of its section."""
    section: ClassVar[str] = "plugins"
    """``plugins`` (section ``plugins.<name>``), or a top-level section it owns (``quantization``)."""
    requires: ClassVar[tuple[Requirement, ...]] = ()
    """Packages it needs beyond turbotune's own dependencies."""
    model_types: ClassVar[tuple[str, ...] | None] = None
    """``config.model_type`` values it supports; ``None`` means any model."""
    order: ClassVar[int] = 100
    """Hooks run in increasing order: loaders ~10, adapters ~50, patches ~100."""
    loads_model: ClassVar[bool] = False
    """Whether it implements ``load_model`` (at most one active plugin may)."""

    def __init__(self, config: Any):
        self.config = config

    # --- activation ------------------------------------------------------------------------

    @classmethod
    def section_of(cls, cfg: Config) -> dict[str, Any] | Any | None:
        """Its raw section if the run activates it, else ``None``.

        The default: active when ``plugins.<name>`` is present and not ``enabled: false``.
        Plugins that own a top-level section override this.
        """
        if cls.section == "plugins":
            if cls.name not in cfg.plugins:
                return None
            raw = dict(cfg.plugins[cls.name] or {})
            if raw.pop("enabled", True) is False:
                return None
            return raw
        return getattr(cfg, cls.section)

    # --- checks ----------------------------------------------------------------------------

    @classmethod
    def missing(cls) -> list[Requirement]:
        return [r for r in cls.requires if not r.installed()]

    @classmethod
    def check_packages(cls) -> None:
        for req in cls.missing():
            raise MissingPackageError(
                req.module, feature=f"plugin '{cls.name}'", pip=req.install_command()
            )

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if ``model`` is not a supported family."""
        if self.model_types is None:
            return
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise UnsupportedModelError(
                f"plugin '{self.name}' does not support model type '{model_type}'; supported: "
                f"{', '.join(self.model_types)}. Disable it (plugins.{self.name}.enabled=false) "
                f"or use a supported model."
            )

    # --- hooks -----------------------------------------------------------------------------

    def load_model(self, path: str, **kwargs: Any) -> PreTrainedModel:
        raise NotImplementedError(f"plugin '{self.name}' does not load models")

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        return model, training_args

    def callbacks(self, model: PreTrainedModel) -> list[TrainerCallback]:
        return []

    def data_collator(
        self, tokenizer: Any, training_args: TrainingArguments | None
    ) -> Callable[[list[dict[str, Any]]], dict[str, Any]] | None:
        """The Trainer's collator (e.g. padding-free batches), or ``None`` to leave it to
        others; at most one active plugin may return one."""
        return None

    def train_batch_sampler(
        self, dataset: Any, training_args: TrainingArguments | None
    ) -> Iterable[list[int]] | None:
        """A batch sampler of the training set (lists of indices; e.g. packing by tokens), or
        ``None``; at most one active plugin may return one. It may offer ``set_epoch(epoch)``
        and must give the same batches again for the same epoch (resume skips batches)."""
        return None

    def describe(self) -> str:
        """A short summary of its active options, for the start-up banner."""
        return ""
