"""Multi-GPU training on PyTorch's own FSDP2: sharding, 4-bit storage, loading, checkpoints.

Imports stay lazy (``config.py`` imports :mod:`.config` at start-up). The public API::

    from turbotune.distributed import (
        apply_fsdp, shard_model, NF4Linear, quantize_4bit, build_meta_model, materialize,
        RandomSource, SafetensorsSource, FsdpTrainer, save_sharded, load_sharded,
        init_distributed, build_mesh, torchrun_command,
    )
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistributedConfig": "config",
    "init_distributed": "env",
    "build_mesh": "env",
    "WorldInfo": "env",
    "apply_fsdp": "shard",
    "decoder_blocks": "shard",
    "mixed_precision_policy": "shard",
    "NF4Linear": "nf4",
    "quantize_4bit": "nf4",
    "build_meta_model": "loading",
    "materialize": "loading",
    "RandomSource": "loading",
    "SafetensorsSource": "loading",
    "load_for_fsdp": "model",
    "shard_model": "model",
    "FsdpTrainer": "trainer",
    "ShardedModel": "trainer",
    "save_sharded": "checkpoint",
    "load_sharded": "checkpoint",
    "gather_trainable": "checkpoint",
    "torchrun_command": "launch",
    "memory_report": "memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'turbotune.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
