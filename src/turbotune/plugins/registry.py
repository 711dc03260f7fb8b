"""The plugin registry: built-ins by import path, third-party plugins by entry point.

Built-in plugins are named here as ``"module:Class"`` strings and imported only when needed.
Third-party packages register theirs in the entry-point group ``turbotune.plugins``::

    [project.entry-points."turbotune.plugins"]
    my_plugin = "my_package.plugin:MyPlugin"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import TYPE_CHECKING

from turbotune.configtools import build
from turbotune.errors import ConfigError, TurbotuneError

from .base import Plugin

if TYPE_CHECKING:
    from turbotune.config import Config

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "turbotune.plugins"

BUILTIN: dict[str, str] = {
    "adapter": "turbotune.plugins.adapter:AdapterPlugin",
    "bnb": "turbotune.plugins.bnb:BnbQuantPlugin",
    "fused_ops": "turbotune.plugins.fused_ops:FusedOpsPlugin",
    "expert_parallel": "turbotune.plugins.expert_parallel:ExpertParallelPlugin",
    "fsdp": "turbotune.plugins.fsdp:FsdpPlugin",
    "gptq": "turbotune.plugins.gptq:GPTQPlugin",
    "hqq": "turbotune.plugins.hqq:HQQQuantPlugin",
    "multipack": "turbotune.plugins.multipack:MultipackPlugin",
    "padding_free": "turbotune.plugins.padding_free:PaddingFreePlugin",
}


def _load(target: str) -> type[Plugin]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TurbotuneError(f"'{target}' is not a turbotune Plugin subclass")
    return cls


def discover() -> dict[str, type[Plugin]]:
    """Every known plugin class by name: built-ins, then entry points (which may not shadow)."""
    found: dict[str, type[Plugin]] = {name: _load(target) for name, target in BUILTIN.items()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken third-party plugin must not stop the run
            logger.warning("could not load plugin entry point %r (%s): %s", ep.name, ep.value, err)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            logger.warning("entry point %r does not name a turbotune Plugin subclass", ep.name)
            continue
        name = cls.name or ep.name
        if name in found:
            logger.warning("plugin %r from %s shadows an existing plugin; ignored", name, ep.value)
            continue
        found[name] = cls
    return found


def activate(cfg: Config, available: dict[str, type[Plugin]] | None = None) -> list[Plugin]:
    """Instantiate the plugins the run activates, each with its own checked section, in order.

    Raises:
        ConfigError: a section under ``plugins:`` names no known plugin, or two loaders are on.
        MissingPackageError: an active plugin needs a package that is not installed.
    """
    available = discover() if available is None else available
    plugin_sections = {cls.name for cls in available.values() if cls.section == "plugins"}
    for name in cfg.plugins:
        if name not in plugin_sections:
            raise ConfigError(
                f"{cfg.source}: 'plugins.{name}' names no known plugin; known: "
                f"{', '.join(sorted(plugin_sections)) or '(none)'}. Run `turbotune plugins` to list them."
            )
    active: list[Plugin] = []
    for cls in available.values():
        raw = cls.section_of(cfg)
        if raw is None:
            continue
        cls.check_packages()
        where = f"plugins.{cls.name}" if cls.section == "plugins" else cls.section
        section = (
            raw
            if isinstance(raw, cls.config_cls)
            else build(cls.config_cls, raw, where=where, source=cfg.source)
        )
        active.append(cls(section))
    active.sort(key=lambda p: (p.order, p.name))
    loaders = [p.name for p in active if p.loads_model]
    if len(loaders) > 1:
        raise ConfigError(
            f"{cfg.source}: only one plugin may load the model, but {loaders} are active"
        )
    return active
