"""``turbotune train CONFIG --nproc N``: start the run under ``torchrun``.

Design note. turbotune does not reimplement a launcher: ``--nproc N`` execs PyTorch's own
``torchrun`` (``python -m torch.distributed.run``), which sets ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE``, restarts nothing (``--max-restarts 0``) and relays a failing rank's traceback.
Each process runs ``python -m turbotune train CONFIG ...`` (see ``turbotune/__main__.py``), so
``torchrun --nproc-per-node N -m turbotune train CONFIG`` is the very same run. Several nodes
join through torchrun's c10d rendezvous (``--nnodes``, ``--rdzv-endpoint``); see
``examples/slurm/fsdp_multinode.sbatch``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

__all__ = ["launch", "torchrun_command"]


def torchrun_command(
    train_args: Sequence[str],
    nproc: int,
    *,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The ``torchrun`` command line that runs ``turbotune train`` on ``nproc`` processes per node.

    Args:
        train_args: the words after ``turbotune train`` (config and ``key=value`` overrides).
        nproc: processes per node (one per GPU).
        nnodes: nodes (``"2"`` or an elastic range ``"1:4"``).
        rdzv_endpoint: ``host:port`` of the c10d rendezvous (several nodes); default: a
            standalone single-node rendezvous on a free port.
        rdzv_id: job id shared by the nodes (e.g. ``$SLURM_JOB_ID``).
        python: the interpreter (default: this one).

    Returns:
        The argument vector.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None and str(nnodes) == "1":
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", rdzv_endpoint or "localhost:29500"]
        if rdzv_id:
            cmd += ["--rdzv-id", rdzv_id]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", "0"]
    return [*cmd, "-m", "turbotune", "train", *train_args]


def launch(cmd: Sequence[str]) -> int:
    """Run ``cmd`` and return its exit status (the status of the first failing rank)."""
    return subprocess.call(list(cmd))
