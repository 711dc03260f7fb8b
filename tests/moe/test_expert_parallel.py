"""Expert parallelism on 2 CPU processes (gloo) against transformers' full block in one process:
outputs, input / router / expert-shard gradients, and a gathered checkpoint that loads in
transformers (the ranks' assertions run in tests/moe/ep_worker.py)."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.moe import ep_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_expert_parallel_two_processes(tmp_path, backend: str) -> None:
    # fork: the ranks inherit the imported torch/transformers (a fresh import costs ~10 s each).
    args = (2, _free_port(), str(tmp_path), backend)
    mp.start_processes(ep_worker.run, args=args, nprocs=2, join=True, start_method="fork")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("backend", ["triton", "loop"])  # fp32 tiny model: no torch._grouped_mm
def test_expert_parallel_two_gpus_nccl(tmp_path, backend: str) -> None:
    """The same checks on 2 GPUs with NCCL (spawned: CUDA does not survive a fork)."""
    args = (2, _free_port(), str(tmp_path), backend, True)
    mp.start_processes(ep_worker.run, args=args, nprocs=2, join=True, start_method="spawn")
