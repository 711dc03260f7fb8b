"""One process of a two-process gloo world that trains :class:`tiny.TinyLM` (NF4 + LoRA) under several
``distributed:`` configurations in turn (the imports are paid once).

``python options_worker.py OUT.json VARIANTS.json`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set
by the caller): for each ``{"name": ..., "config": {...}}`` this process shards a fresh model
with ``DistributedConfig(enabled=True, **config)``, trains 3 AdamW steps on its rows of each
global batch, and rank 0 writes, per variant, the global losses (mean over processes), the full
trainable weights and the names of the sharded parameters (``torch.save``). The caller sets
``TRITON_INTERPRET=0``: the eager dequantizer (interpreted Triton would take minutes).
"""

from __future__ import annotations

import sys

from tiny import FP32, ROWS, STEPS, TinyLM, batches, mean_over_ranks, train, worker_main

from turbotune.distributed.config import DistributedConfig
from turbotune.distributed.env import build_mesh, device_for
from turbotune.distributed.shard import apply_fsdp


def _run(variant: dict, info) -> dict:
    cfg = DistributedConfig(enabled=True, **variant["config"])
    cfg.validate()
    model = TinyLM(layers=variant.get("layers", 2))
    mesh = build_mesh(cfg.strategy, info, device_for(info, "cpu"), cfg.shard_size)
    apply_fsdp(model, cfg, FP32, mesh)
    rows = slice(info.rank * ROWS, (info.rank + 1) * ROWS)
    local = [{k: v[rows] for k, v in b.items()} for b in batches(STEPS, rows=2 * ROWS)]
    losses, weights = train(model, local, reduce=mean_over_ranks)
    sharded = sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))
    return {"losses": losses, "weights": weights, "sharded": sharded}


if __name__ == "__main__":
    # TinyLM needs no bitsandbytes (turbotune's NF4 storage is its own); LoRALinear's check for
    # bitsandbytes layers would import it: ~5 s per process on two shared cores.
    sys.modules["bitsandbytes"] = None
    worker_main(_run, sys.argv[1], sys.argv[2])
