"""One process of a two-process gloo world that trains :func:`tiny_gptq.gptq_tiny_lm` (GPTQ bases +
LoRA) sharded by FSDP2 (``apply_fsdp``, which packs the GPTQ storage into sharded parameters).

``python gptq_worker.py OUT.pt VARIANTS.json`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set by the
caller): per ``{"name": ..., "config": {...}}`` a fresh model, 3 AdamW steps on this rank's rows
of each global batch; rank 0 saves per variant the global losses, the full LoRA weights and, per
GPTQ layer, the packed bytes in total and the bytes each rank holds locally.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tiny import FP32, batches, train
from tiny_gptq import gptq_layers, gptq_tiny_lm

from turbotune.distributed.config import DistributedConfig
from turbotune.distributed.env import build_mesh, device_for, init_distributed
from turbotune.distributed.shard import apply_fsdp

STEPS, ROWS = 3, 2  # rows per rank per step


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


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
    losses, weights = train(model, local, reduce=_mean)
    sharded = sorted(n for n, p in model.named_parameters() if hasattr(p, "device_mesh"))
    return {"losses": losses, "weights": weights, "bytes": _local_bytes(model), "sharded": sharded}


def main(out: str, variants_path: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    records = {v["name"]: _run(v, info) for v in json.loads(Path(variants_path).read_text())}
    if info.is_main:
        torch.save(records, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.modules["bitsandbytes"] = None  # not needed; its import costs ~5 s per process
    main(sys.argv[1], sys.argv[2])
