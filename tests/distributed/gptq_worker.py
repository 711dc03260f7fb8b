"""One process of a two-process gloo world that trains :func:`tiny_gptq.gptq_tiny_lm` (GPTQ bases +
LoRA) sharded by FSDP2 (``apply_fsdp``, which packs the GPTQ storage into sharded parameters).

``python gptq_worker.py OUT.pt VARIANTS.json`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set by the
caller): per ``{"name": ..., "config": {...}}`` a fresh model, 3 AdamW steps on this rank's rows
of each global batch (:func:`tiny.train_sharded`, as ``options_worker.py``); rank 0 saves per
variant the global losses, the full LoRA weights and, per GPTQ layer, the packed bytes in total
and the bytes each rank holds locally, and the device of the packed storage.

On the CPU (``tiny.run_two_processes``: gloo, eager dequantizer) or, with
``TURBOTUNE_TEST_DEVICE=cuda`` under ``torchrun``, on ``cuda:LOCAL_RANK`` (NCCL, the Triton
GPTQ kernels): ``test_gptq_fsdp_gpu.py``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from tiny import train_sharded, worker_main
from tiny_gptq import gptq_layers, gptq_tiny_lm


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
    model, record = train_sharded(gptq_tiny_lm, variant, info)
    packed = gptq_layers(model)[0].packed
    where = str((packed.to_local() if hasattr(packed, "to_local") else packed).device)
    print(f"rank {info.rank}: {variant['name']} trained on {where}", flush=True)
    return {**record, "bytes": _local_bytes(model), "device": where}


if __name__ == "__main__":
    sys.modules["bitsandbytes"] = None  # not needed; its import costs ~5 s per process
    worker_main(_run, sys.argv[1], sys.argv[2])
