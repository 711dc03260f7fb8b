"""The environment of a benchmark run, for ``env.json`` and the head of ``results.md``.

Collected in the parent process without touching CUDA (a CUDA context here would hold device
memory through every point): the GPU name and driver come from ``nvidia-smi``, the device the
points actually ran on from the workers' results.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "turbotune")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit() -> str | None:
    """turbotune's commit (``+dirty`` with local changes); ``$TURBOTUNE_COMMIT`` if set."""
    if os.environ.get("TURBOTUNE_COMMIT"):
        return os.environ["TURBOTUNE_COMMIT"]
    repo = Path(__file__).resolve().parents[3]
    if not (repo / ".git").exists() or shutil.which("git") is None:
        return None
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if commit is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return commit + ("+dirty" if dirty else "")


def nvidia_smi() -> dict[str, Any]:
    """GPU names, driver version and memory from ``nvidia-smi`` (empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    text = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    if not text:
        return {}
    gpus = [[x.strip() for x in line.split(",")] for line in text.splitlines()]
    return {"gpus": [g[0] for g in gpus], "driver": gpus[0][1], "gpu_memory": gpus[0][2]}


def collect_env(argv: list[str] | None = None) -> dict[str, Any]:
    """Date, host, Python, package versions, CUDA build, GPUs, driver, commit, command line."""
    import torch

    from turbotune.backends import package_versions

    argv = sys.argv if argv is None else argv
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(PACKAGES),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "",
        **nvidia_smi(),
    }


def add_device(env: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill ``device_name`` and ``peak_flops`` from the first point that ran."""
    ran = next((r for r in rows if r.get("status") == "ok"), None)
    if ran is not None:
        env["device_name"] = ran.get("device_name")
        env["peak_flops"] = ran.get("peak_flops")
    return env
