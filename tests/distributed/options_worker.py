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

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tiny import FP32, TinyLM, batches, train

from turbotune.distributed.config import DistributedConfig
from turbotune.distributed.env import build_mesh, device_for, init_distributed
from turbotune.distributed.shard import apply_fsdp

STEPS, ROWS = 3, 2  # rows per rank per step


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _run(variant: dict, info) -> dict:
    cfg = DistributedConfig(enabled=True, **variant["config"])
    cfg.validate()
    model = TinyLM(layers=variant.get("layers", 2))
    mesh = build_mesh(cfg.strategy, info, device_for(info, "cpu"), cfg.shard_size)
    apply_fsdp(model, cfg, FP32, mesh)
    rows = slice(info.rank * ROWS, (info.rank + 1) * ROWS)
    local = [{k: v[rows] for k, v in b.items()} for b in batches(STEPS, rows=2 * ROWS)]
    losses, weights = train(model, local, reduce=_mean)
    sharded = sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))
    return {"losses": losses, "weights": weights, "sharded": sharded}


def main(out: str, variants_path: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    records = {v["name"]: _run(v, info) for v in json.loads(Path(variants_path).read_text())}
    if info.is_main:
        torch.save(records, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # TinyLM needs no bitsandbytes (turbotune's NF4 storage is its own); LoRALinear's check for
    # bitsandbytes layers would import it: ~5 s per process on two shared cores.
    sys.modules["bitsandbytes"] = None
    main(sys.argv[1], sys.argv[2])
