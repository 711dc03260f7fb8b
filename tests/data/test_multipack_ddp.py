"""Multipack under data parallelism with the real Trainer: ``torchrun`` 2 processes on CPU (gloo).

Each rank must run exactly its share of the sampler (batch ``i`` to rank ``i % 2``, as
accelerate deals them), both ranks the same number of steps, and together every row exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_split_one_epoch_exactly(tmp_path):
    pytest.importorskip("datasets")
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), str(HERE / "multipack_ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    rows = []
    for r, rank in enumerate(ranks):
        got = [batch["rows"] for batch in rank["seen"]]
        assert got == rank["expected"], f"rank {r} ran other batches than its share"
        rows.extend(i for batch in got for i in batch)
    assert sorted(rows) == list(range(48)), "every row exactly once over both ranks"
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"])
