"""Expert parallelism on 2 GPUs (NCCL) as one command: ``torchrun --nproc-per-node 2`` on
tests/moe/ep_gpu_worker.py (expert parallelism + FSDP2 parity on a tiny model, the HF-layout
export, the config path, and one layer at the Qwen3-30B-A3B shape in bf16).

    python -m pytest tests/moe/test_ep_gpu.py -m gpu -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.moe.test_expert_parallel import _free_port

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]  # tests/conftest.py skips below 2 GPUs
_WORKER = Path(__file__).with_name("ep_gpu_worker.py")


@pytest.mark.parametrize("backend", ["grouped_mm", "triton", "mm_loop"])
def test_expert_parallel_two_gpus_torchrun(tmp_path, backend: str) -> None:
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), str(_WORKER), str(tmp_path), backend,
    ]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{tail}"
    for rank in (0, 1):
        assert f"rank {rank}: expert-parallel GPU checks passed ({backend})" in done.stdout, tail
