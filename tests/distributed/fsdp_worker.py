"""``turbotune train`` runs inside one ``torchrun`` (or plain) process of a test.

``python fsdp_worker.py OUT.json CONFIG.json [CONFIG.json ...]`` runs
:func:`turbotune.train.run.run_training` on each config in turn, in the same processes (the
imports are paid once), and rank 0 writes one record per config: the losses and gradient norms
by step, the world size, what low-memory loading did, the fused-op patch counts and how many
blocks were checkpointed/offloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _record(result: Any) -> dict[str, Any]:
    model = result.trainer.model
    logs = result.trainer.state.log_history
    patches = model.__dict__.get("_turbotune_patches")
    stats = model.__dict__.get("_turbotune_load_stats") or {}
    return {
        "losses": {int(h["step"]): h["loss"] for h in logs if "loss" in h},
        "grad_norms": {int(h["step"]): h["grad_norm"] for h in logs if "grad_norm" in h},
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "load_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        "patches": dict(patches.counts) if patches is not None else {},
        "wrapped_blocks": sum("_turbotune_block_wrapped" in m.__dict__ for m in model.modules()),
        "trainer": type(result.trainer).__name__,
        "batch_sampler": type(getattr(result.trainer, "_batch_sampler", None)).__name__,
        **_gptq_shards(model),
    }


def _gptq_shards(model: Any) -> dict[str, Any]:
    """How many GPTQ layers hold packed storage, and the largest local share of one (a
    sharded parameter is a DTensor: its local shard against its global size)."""
    packed = [
        m._parameters["packed"]
        for m in model.modules()
        if type(m).__name__ == "GPTQLinear" and "packed" in m._parameters
    ]
    shares = [
        (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) / p.numel() for p in packed
    ]
    return {"gptq_packed": len(packed), "gptq_max_local_share": max(shares, default=0.0)}


def main(out_path: str, *cfg_paths: str) -> None:
    torch.set_num_threads(1)
    from turbotune.train.run import run_training

    records = [_record(run_training(json.loads(Path(p).read_text()))) for p in cfg_paths]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
