"""The MLX engine's training log: the Trainer's metrics, in ``metrics.jsonl`` and on the console.

Between two logs, :class:`MetricsLog` sums the step losses and the input/target tokens; a log
writes ``loss`` (mean of the window's step losses, as the Trainer logs it), ``learning_rate``,
``grad_norm``, ``tokens_per_s`` (tokens that carry a loss), ``input_tokens_per_s``,
``step_time_s``, ``peak_mem_gib`` (MLX's allocator peak, ``mx.get_peak_memory``; on the CPU build
too) and ``epoch``, as one JSON line of ``<output_dir>/metrics.jsonl`` (with ``step`` and
``time``, like :mod:`turbotune.train.metrics`) and one line of :func:`format_log`. Every MLX
array is evaluated before a log, so the window's time is the work done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from turbotune.train.metrics import METRICS_FILE, format_log

__all__ = ["MetricsLog"]

GIB = 2**30


class MetricsLog:
    """Window sums between logs; writes metrics.jsonl and prints the Trainer's compact line.

    Args:
        output_dir: folder of ``metrics.jsonl`` (created).
        max_steps: the run's optimizer steps (shown as ``step/max_steps``).
        steps_per_epoch: optimizer steps per epoch (for ``epoch``).
    """

    def __init__(self, output_dir: Path, max_steps: int, steps_per_epoch: int):
        self.path = output_dir / METRICS_FILE
        output_dir.mkdir(parents=True, exist_ok=True)
        self.max_steps, self.steps_per_epoch = max_steps, steps_per_epoch
        self.history: list[dict[str, float]] = []
        self._reset(0, time.perf_counter())

    def _reset(self, step: int, now: float) -> None:
        self.t0, self.step0 = now, step
        self.losses: list[float] = []
        self.input_tokens = self.target_tokens = 0

    def add(self, loss: float, input_tokens: int, target_tokens: int) -> None:
        self.losses.append(loss)
        self.input_tokens += input_tokens
        self.target_tokens += target_tokens

    def log(self, step: int, lr: float, grad_norm: float) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self.t0, 1e-9)
        logs = {
            "loss": float(np.mean(self.losses)),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": self.target_tokens / seconds,
            "input_tokens_per_s": self.input_tokens / seconds,
            "step_time_s": seconds / max(1, step - self.step0),
            "peak_mem_gib": mx.get_peak_memory() / GIB,
            "epoch": step / self.steps_per_epoch,
        }
        self.write(step, logs)
        self._reset(step, now)
        return logs

    def write(self, step: int, logs: dict[str, float]) -> None:
        from tqdm.auto import tqdm

        self.history.append({"step": step, **logs})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **logs}) + "\n")
        tqdm.write(format_log(logs, step=step, max_steps=self.max_steps))
