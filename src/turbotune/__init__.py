"""turbotune: fast, cheap fine-tuning of large language models on the Hugging Face Trainer.

``import turbotune`` is cheap and works without a GPU or Triton: the heavy modules (transformers,
Triton kernels) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from turbotune.config import Config, load_config
    from turbotune.framework import AccelerationFramework

__all__ = ["AccelerationFramework", "Config", "__version__", "load_config"]

_LAZY = {
    "AccelerationFramework": "turbotune.framework",
    "Config": "turbotune.config",
    "load_config": "turbotune.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'turbotune' has no attribute {name!r}")
