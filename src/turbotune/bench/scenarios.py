"""Scenario files: ``defaults`` + ``scenarios``, expanded into points.

A scenario file (after fms-acceleration's ``defaults.yaml``/``scenarios.yaml`` pair, in one file)::

    baseline: hf-qlora            # which scenario the ratios compare to (default: the first)
    defaults:                     # any Settings field; each scenario may override any of them
      models: [llama-3.1-8b]
      shapes: ["4x1024", "8x1024+gc"]   # or batch_sizes x seq_lens x gradient_checkpointing
      warmup: 3
      steps: 10
    scenarios:
      - name: hf-qlora            # a built-in baseline, by name
      - name: turbotune-qlora     # a turbotune config (inline, a file, or a sample name)
        config: {quantization: {method: nf4}}

A *point* is one (model, batch size, sequence length, gradient checkpointing, GPU count); every
scenario runs at each of its points, and the ratios of a scenario are taken against the
baseline scenario at the same point. The baseline runs first, then the other built-in
baselines, then the turbotune scenarios, each in file order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from turbotune.bench.models import parse_model_spec
from turbotune.bench.setups import BASELINES, DEFAULT_LORA
from turbotune.configtools import build
from turbotune.errors import ConfigError

_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(\+\s*gc)?\s*$")


@dataclass
class Shape:
    """One batch shape (an alternative to crossing ``batch_sizes`` and ``seq_lens``)."""

    batch_size: int
    seq_len: int
    gradient_checkpointing: bool = False


@dataclass
class Settings:
    """What every point of a scenario shares; ``defaults`` sets them, a scenario overrides."""

    models: list[str] = field(default_factory=lambda: ["llama-3.1-8b"])
    """Model specs: a table name, a checkpoint directory or config.json, ``name@layers=4``."""
    batch_sizes: list[int] = field(default_factory=lambda: [4])
    """Micro-batch sizes (per GPU), crossed with ``seq_lens`` unless ``shapes`` is given."""
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    """Tokens per row (the truncation length, for a dataset)."""
    gradient_checkpointing: list[bool] = field(default_factory=lambda: [False])
    """Activation checkpointing off/on (crossed with the batch shapes)."""
    shapes: list[Any] | None = None
    """Explicit shapes instead of the cross product: ``"4x1024"``, ``"8x1024+gc"`` or mappings
    ``{batch_size, seq_len, gradient_checkpointing}``."""
    gpus: list[int] = field(default_factory=lambda: [1])
    """GPU counts; more than one launches the point with torchrun (DDP)."""
    warmup: int = 3
    """Untimed steps before timing."""
    steps: int = 10
    """Timed steps (the median step time is reported)."""
    precision: str = "bf16"
    """turbotune precision mode (``bf16``, ``fp32``, ``bf16_autocast``...) of every scenario
    whose config does not set ``train.precision``."""
    learning_rate: float = 2e-4
    """AdamW learning rate."""
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA))
    """LoRA settings shared by baselines and turbotune configs (``r``, ``alpha``, ``dropout``,
    ``target_modules``); a config's own ``adapter`` keys win."""
    attn_implementation: str = "sdpa"
    """transformers attention implementation."""
    data: str = "random"
    """``random`` token ids, or a dataset file (its real lengths, padded per batch)."""
    tokenizer: str | None = None
    """Tokenizer directory for a dataset file."""
    seed: int = 42
    """Seed of weights, adapters and data (the same for every scenario)."""
    timeout: float = 1800.0
    """Seconds a point may take before it is stopped and recorded as ``timeout``."""


_LIST_FIELDS = ("models", "batch_sizes", "seq_lens", "gradient_checkpointing", "gpus")


@dataclass
class Scenario:
    """A named training configuration with its settings."""

    name: str
    builtin: str | None
    """A baseline name of :data:`turbotune.bench.setups.BASELINES`, or ``None``."""
    config: dict[str, Any] | None
    """The turbotune config dict (``None`` for a baseline)."""
    settings: Settings
    is_baseline: bool = False


@dataclass(frozen=True)
class Point:
    """One scenario at one shape: everything a worker needs."""

    scenario: str
    builtin: str | None
    config: dict[str, Any] | None
    model: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    gpus: int
    is_baseline: bool
    settings: Settings

    @property
    def key(self) -> tuple[str, int, int, bool, int]:
        """Identifies the point across scenarios (the baseline has the same key)."""
        return (self.model, self.batch_size, self.seq_len, self.gradient_checkpointing, self.gpus)

    @property
    def label(self) -> str:
        gc = "+gc" if self.gradient_checkpointing else ""
        gpus = f" x{self.gpus}gpu" if self.gpus > 1 else ""
        return f"{self.model} {self.batch_size}x{self.seq_len}{gc}{gpus}"

    def spec(self, output_dir: str) -> dict[str, Any]:
        """The JSON spec of :mod:`turbotune.bench.worker`."""
        s = self.settings
        return {
            "scenario": self.scenario, "point": self.label, "builtin": self.builtin,
            "config": self.config, "model": self.model, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "gradient_checkpointing": self.gradient_checkpointing,
            "gpus": self.gpus, "warmup": s.warmup, "steps": s.steps, "precision": s.precision,
            "learning_rate": s.learning_rate, "lora": s.lora,
            "attn_implementation": s.attn_implementation, "data": s.data,
            "tokenizer": s.tokenizer, "seed": s.seed, "output_dir": output_dir,
        }  # fmt: skip


def _as_list(data: dict[str, Any]) -> dict[str, Any]:
    """Let list settings be given as one value (``models: llama-3.1-8b``)."""
    return {
        k: ([v] if k in _LIST_FIELDS and not isinstance(v, list) else v) for k, v in data.items()
    }


def parse_shape(value: Any, where: str) -> Shape:
    """``"4x1024"``, ``"8x1024+gc"`` or a mapping, as a :class:`Shape`."""
    if isinstance(value, dict):
        return build(Shape, value, where=where, source="scenarios")
    match = _SHAPE.match(str(value))
    if not match:
        raise ConfigError(
            f"'{where}' is {value!r}; write BATCHxSEQ or BATCHxSEQ+gc (e.g. 8x1024+gc)"
        )
    return Shape(int(match[1]), int(match[2]), bool(match[3]))


def _load_config(value: Any, base: Path, where: str) -> dict[str, Any]:
    """A scenario's ``config``: a mapping, or a YAML file (relative to the scenario file or to
    the current directory)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"'{where}' must be a mapping or a config file path")
    path = Path(value).expanduser()
    if not path.is_absolute() and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise ConfigError(
            f"'{where}': config file '{value}' not found (relative paths are tried "
            f"against {base} and the current directory)"
        )
    return yaml.safe_load(path.read_text()) or {}


def load_scenarios(
    path: str | Path, *, steps: int | None = None, warmup: int | None = None
) -> list[Scenario]:
    """Read a scenario file; baseline first, then built-ins, then turbotune configs.

    Args:
        path: the YAML file.
        steps: override every scenario's timed steps (``--steps``).
        warmup: override every scenario's warm-up steps (``--warmup``).

    Raises:
        ConfigError: an unknown key, a duplicate or unknown scenario name, a bad shape or model.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"defaults", "scenarios", "baseline", "description"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level keys {sorted(unknown)}; valid: baseline, defaults, scenarios, description"
        )
    defaults = _as_list(dict(data.get("defaults") or {}))
    build(Settings, defaults, where="defaults", source=str(path))  # check early
    entries = data.get("scenarios") or []
    if not entries:
        raise ConfigError(f"{path}: 'scenarios' is empty")
    scenarios: list[Scenario] = []
    for i, entry in enumerate(entries):
        scenarios.append(_scenario(entry, defaults, path, i, steps, warmup))
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: scenario names must be unique; repeated: {dupes}")
    baseline = data.get("baseline", names[0])
    if baseline not in names:
        raise ConfigError(f"{path}: baseline '{baseline}' is not a scenario; scenarios: {names}")
    for s in scenarios:
        s.is_baseline = s.name == baseline
    return sorted(scenarios, key=lambda s: (not s.is_baseline, s.builtin is None))


def _scenario(
    entry: Any, defaults: dict[str, Any], path: Path, i: int, steps: int | None, warmup: int | None
) -> Scenario:
    where = f"scenarios[{i}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{path}: '{where}' needs a 'name'")
    entry = dict(entry)
    name = str(entry.pop("name"))
    builtin = entry.pop("builtin", None)
    config = entry.pop("config", None)
    if builtin is None and config is None:
        if name not in BASELINES:
            raise ConfigError(
                f"{path}: scenario '{name}' has no 'config' and is not a built-in baseline "
                f"({', '.join(BASELINES)})"
            )
        builtin = name
    if builtin is not None and builtin not in BASELINES:
        raise ConfigError(
            f"{path}: '{where}.builtin' is '{builtin}'; built-in: {', '.join(BASELINES)}"
        )
    if builtin is not None and config is not None:
        raise ConfigError(f"{path}: scenario '{name}' gives both 'builtin' and 'config'")
    if config is not None:
        config = _load_config(config, path.parent, f"{where}.config")
    merged = {**defaults, **_as_list(entry)}
    if steps is not None:
        merged["steps"] = steps
    if warmup is not None:
        merged["warmup"] = warmup
    settings = build(Settings, merged, where=f"scenarios.{name}", source=str(path))
    for model in settings.models:
        parse_model_spec(model)
    return Scenario(name, builtin, config, settings)


def _shapes(s: Settings, name: str) -> list[Shape]:
    if s.shapes is not None:
        return [parse_shape(v, f"scenarios.{name}.shapes[{i}]") for i, v in enumerate(s.shapes)]
    return [
        Shape(b, L, gc)
        for b, L, gc in itertools.product(s.batch_sizes, s.seq_lens, s.gradient_checkpointing)
    ]


def expand(scenarios: list[Scenario], only: list[str] | None = None) -> list[Point]:
    """Every point of every scenario, in run order.

    Args:
        scenarios: from :func:`load_scenarios` (baseline first).
        only: keep these scenario names (the baseline is always kept: ratios need it).

    Raises:
        ConfigError: ``only`` names a scenario that does not exist.
    """
    if only:
        names = {s.name for s in scenarios}
        missing = [n for n in only if n not in names]
        if missing:
            raise ConfigError(
                f"--only names unknown scenarios {missing}; scenarios: {sorted(names)}"
            )
        scenarios = [s for s in scenarios if s.name in only or s.is_baseline]
    points = []
    for sc in scenarios:
        s = sc.settings
        for model, shape, gpus in itertools.product(s.models, _shapes(s, sc.name), s.gpus):
            points.append(
                Point(
                    sc.name, sc.builtin, sc.config, model, shape.batch_size, shape.seq_len,
                    shape.gradient_checkpointing, gpus, sc.is_baseline, s,
                )
            )  # fmt: skip
    return points
