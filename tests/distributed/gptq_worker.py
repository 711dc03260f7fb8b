"""One process of a two-process gloo world that trains :func:`tiny_gptq.gptq_tiny_lm` (GPTQ bases +
LoRA) sharded by FSDP2 (``apply_fsdp``, which packs the GPTQ storage into sharded parameters).

``python gptq_worker.py OUT.pt VARIANTS.json`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set by the
caller): per ``{"name": ..., "config": {...}}`` a fresh model, 3 AdamW steps on this rank's rows
of each global batch; rank 0 saves per variant the global losses, the full LoRA weights and, per
GPTQ layer, the packed bytes in total and the bytes each rank holds locally.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from tiny import FP32, ROWS, STEPS, batches, mean_over_ranks, train, worker_main
from tiny_gptq import gptq_layers, gptq_tiny_lm

from turbotune.distributed.config import DistributedConfig
from turbotune.distributed.env import build_mesh, device_for
from turbotune.distributed.shard import apply_fsdp


def _local_bytes(model: torch.nn.Module) -> list[list[int]]:
    """Per GPTQ layer: ``[total packed bytes, bytes of rank 0's shard, bytes of rank 1's...]``."""
    rows = []
    for layer in gptq_layers(model):
        p = layer.packed
        local = p.to_local() if hasattr(p, "to_local") else p
        mine = torch.tensor([local.numel() * local.element_size()])
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        rows.append([layer.packed_layout.nbytes, *(int(t) for t in every)])
    return rows


def _run(variant: dict, info) -> dict:
    cfg = DistributedConfig(enabled=True, **variant["config"])
    cfg.validate()
    model = gptq_tiny_lm()
    mesh = build_mesh(cfg.strategy, info, device_for(info, "cpu"), cfg.shard_size)
    apply_fsdp(model, cfg, FP32, mesh)
    rows = slice(info.rank * ROWS, (info.rank + 1) * ROWS)
    local = [{k: v[rows] for k, v in b.items()} for b in batches(STEPS, rows=2 * ROWS)]
    losses, weights = train(model, local, reduce=mean_over_ranks)
    sharded = sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))
    return {"losses": losses, "weights": weights, "bytes": _local_bytes(model), "sharded": sharded}


if __name__ == "__main__":
    sys.modules["bitsandbytes"] = None  # not needed; its import costs ~5 s per process
    worker_main(_run, sys.argv[1], sys.argv[2])
