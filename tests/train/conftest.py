"""Shared pieces of the ``turbotune train`` tests: small run configs on the real TinyStories model
and one LoRA run that several test files inspect (its adapter, merge, generate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import one_thread

REPO = Path(__file__).resolve().parents[2]


def stories_config(
    model: Path,
    data: Path,
    output_dir: Path,
    *,
    adapter: dict[str, Any] | None = None,
    **train: Any,
) -> dict[str, Any]:
    """A seconds-long run: the real 260K-parameter Llama on a few rows of real data, fp32.

    Args:
        model: the stories260K ``hf`` directory.
        data: a data file.
        output_dir: the run's output directory.
        adapter: keys of the ``adapter`` section (default: LoRA r=4).
        **train: keys of the ``train`` section on top of the defaults here.
    """
    return {
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 64, "max_samples": 24},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, **(adapter or {})},
        "train": {
            "precision": "fp32",
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "output_dir": str(output_dir),
            "report_to": [],
            **train,
        },
    }


def step_losses(log_history: list[dict[str, Any]]) -> dict[int, float]:
    """``{step: training loss}`` from ``trainer.state.log_history`` or ``metrics.jsonl`` lines."""
    return {int(h["step"]): float(h["loss"]) for h in log_history if "loss" in h}


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``<output_dir>/metrics.jsonl``."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _cli(args: tuple[str, ...], cwd: Path) -> subprocess.Popen:
    # CPU only (same numbers as the in-process references on a GPU machine), one thread.
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "turbotune", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_clis(*commands: tuple[str, ...], cwd: Path = REPO, timeout: float = 300) -> list[Any]:
    """``python -m turbotune ARGS`` for each command, started together (each process spends
    most of its time importing torch and transformers on one core), in fresh processes as a
    user runs them. Returns ``subprocess.CompletedProcess`` objects in order."""
    procs = [_cli(args, cwd) for args in commands]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m turbotune ARGS`` in a fresh process, output captured."""
    return run_clis(args, cwd=cwd, timeout=timeout)[0]


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


@pytest.fixture(scope="session")
def trained_lora(stories260k: Path, alpaca_tiny: Path, tmp_path_factory):
    """One LoRA run through ``run_training`` with an eval split; several tests inspect it."""
    from turbotune.train.run import run_training

    out = tmp_path_factory.mktemp("lora-run")
    cfg = stories_config(stories260k, alpaca_tiny, out, max_steps=12, lr_scheduler="constant")
    cfg["data"].update(max_samples=None, max_length=96, eval_ratio=0.1)
    cfg["train"].update(per_device_train_batch_size=8, logging_steps=4)
    with one_thread():
        return run_training(cfg, ["adapter.r=8", "adapter.alpha=16"])
