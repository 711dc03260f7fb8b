"""Expert parallelism combined with FSDP2 on 2 CPU processes (gloo): per-step losses and every
trainable gradient (LoRA, routers, expert shards) equal a one-process run, and the trained model
is written back to the Hugging Face layout from the shards (the ranks' assertions run in
tests/moe/ep_fsdp_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.moe import ep_fsdp_worker
from tests.moe.test_expert_parallel import _free_port


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_expert_parallel_with_fsdp2_two_processes(tmp_path) -> None:
    # fork: the ranks inherit the imported torch/transformers (a fresh import costs ~10 s each).
    args = (2, _free_port(), str(tmp_path), "loop")
    mp.start_processes(ep_fsdp_worker.run, args=args, nprocs=2, join=True, start_method="fork")
