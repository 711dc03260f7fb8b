"""One process of a two-process gloo world that trains :class:`tiny.TinyLM` (NF4 + LoRA) under several
``distributed:`` configurations in turn (the imports are paid once).

``python options_worker.py OUT.json VARIANTS.json`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set
by the caller): for each ``{"name": ..., "config": {...}}`` this process shards a fresh model
with ``DistributedConfig(enabled=True, **config)``, trains 3 AdamW steps on its rows of each
global batch (:func:`tiny.train_sharded`, shared with ``gptq_worker.py``), and rank 0 writes,
per variant, the global losses (mean over processes), the full trainable weights and the names
of the sharded parameters (``torch.save``). The caller sets ``TRITON_INTERPRET=0``: the eager
dequantizer (interpreted Triton would take minutes).
"""

from __future__ import annotations

import sys

from tiny import TinyLM, train_sharded, worker_main


def _run(variant: dict, info) -> dict:
    return train_sharded(lambda: TinyLM(layers=variant.get("layers", 2)), variant, info)[1]


if __name__ == "__main__":
    # TinyLM needs no bitsandbytes (turbotune's NF4 storage is its own); LoRALinear's check for
    # bitsandbytes layers would import it: ~5 s per process on two shared cores.
    sys.modules["bitsandbytes"] = None
    worker_main(_run, sys.argv[1], sys.argv[2])
