"""One ``turbotune train`` run inside a test's ``torchrun`` (or plain) process.

``python fsdp_worker.py CONFIG.json OUT.json``: runs :func:`turbotune.train.run.run_training`
on the config and, on rank 0, writes ``{"losses": {step: loss}, "grad_norms": {step: norm}}``.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(cfg_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    from turbotune.train.run import run_training

    cfg = json.loads(open(cfg_path).read())
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        logs = result.trainer.state.log_history
        out = {
            "losses": {int(h["step"]): h["loss"] for h in logs if "loss" in h},
            "grad_norms": {int(h["step"]): h["grad_norm"] for h in logs if "grad_norm" in h},
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            "load_stats": _load_stats(result.trainer.model),
        }
        with open(out_path, "w") as f:
            json.dump(out, f)


def _load_stats(model) -> dict:
    stats = model.__dict__.get("_turbotune_load_stats") or {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
