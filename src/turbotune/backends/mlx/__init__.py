"""The MLX backend: LoRA and 4-bit QLoRA of a turbotune config with Apple's MLX.

``backend: mlx`` (or ``turbotune train --backend mlx``) runs :func:`train_mlx` instead of the
Hugging Face Trainer: the same config, data pipeline, schedules and metrics, an adapter saved
in the PEFT format. MLX runs on Apple silicon (Metal) and, through ``mlx[cpu]``, on Linux CPUs,
where turbotune's tests run it; see docs/backends.md for what is verified where.

Importing this package needs ``mlx`` and ``mlx-lm`` (``pip install 'turbotune[mlx]'``); the
names below are imported on first use so that the error says how to install them.
"""

from __future__ import annotations

import importlib
from typing import Any

from turbotune.errors import MissingPackageError

__all__ = [
    "base_weights", "build_mlx_run", "convert_mlx_adapter", "dequantized_base", "require_mlx",
    "train_mlx",
]  # fmt: skip

_LAZY = {
    "train_mlx": "turbotune.backends.mlx.train",
    "build_mlx_run": "turbotune.backends.mlx.train",
    "dequantized_base": "turbotune.backends.mlx.train",
    "convert_mlx_adapter": "turbotune.backends.mlx.export",
    "base_weights": "turbotune.backends.mlx.model",
}


def require_mlx() -> None:
    """Raise a :class:`MissingPackageError` that says how to install MLX when it is absent."""
    for module, package in (("mlx.core", "mlx"), ("mlx_lm", "mlx-lm")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingPackageError(
                package, feature="backend 'mlx'", pip="pip install 'turbotune[mlx]'"
            ) from None


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name != "convert_mlx_adapter":  # the converter needs numpy and peft only
        require_mlx()
    return getattr(importlib.import_module(_LAZY[name]), name)
