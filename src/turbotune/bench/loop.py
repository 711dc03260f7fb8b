"""The timed training loop, identical for every scenario, and the memory meter.

One step = forward with labels, backward, ``AdamW.step``, ``zero_grad``. Warm-up steps run
first (kernel autotuning, allocator growth, lazy inits), then the timed steps. Step boundaries
are marked with CUDA events (no synchronization inside the loop, so the CPU may run ahead as it
does in real training); the time of step ``i`` is the gap between marks ``i`` and ``i+1``, so
nothing between steps escapes the clock. The device is synchronized before the first mark and
after the last. On CPU the marks are ``time.perf_counter``. Losses stay on the device until the
end, so reading them does not synchronize either.

Memory is measured from just before the first step: CUDA peak allocated and reserved bytes
(``reset_peak_memory_stats`` after the model is built), or on CPU the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows it).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from turbotune.bench.data import Batch


class MemoryMeter:
    """Peak memory of the device since :meth:`reset`, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # drop the build's freed blocks from "reserved"
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak(self) -> tuple[int, int]:
        """``(peak allocated, peak reserved)``; on CPU both are the peak RSS."""
        if self.device.type == "cuda":
            return (
                torch.cuda.max_memory_allocated(self.device),
                torch.cuda.max_memory_reserved(self.device),
            )
        rss = _vm_hwm()
        return rss, rss


def _vm_hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass
class LoopResult:
    """What the timed loop measured."""

    step_times: list[float]
    """Seconds of each timed step."""
    step_tokens: list[int]
    """Non-padding tokens of each timed step."""
    losses: list[float]
    """Loss of every step, warm-up included."""
    peak_allocated: int
    peak_reserved: int
    wall_time: float
    """Seconds from the first timed step's start to the last one's end (synchronized)."""

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tokens_per_s(self) -> float:
        """Mean tokens per step over the median step time (robust to one slow step)."""
        return statistics.fmean(self.step_tokens) / self.median_step_time


class _Clock:
    """Step-boundary marks: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        self.sync()
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_loop(
    model: torch.nn.Module,
    batches: list[Batch],
    *,
    warmup: int,
    steps: int,
    learning_rate: float,
    autocast: torch.dtype | None,
    device: torch.device,
    meter: MemoryMeter,
) -> LoopResult:
    """Train ``warmup + steps`` steps on ``batches`` (one per step) and time the last ``steps``.

    Args:
        model: the prepared model (trainable parameters have ``requires_grad``).
        batches: ``warmup + steps`` batches on ``device``.
        warmup: untimed steps first.
        steps: timed steps (at least 1).
        learning_rate: AdamW learning rate (no weight decay, no schedule, no clipping).
        autocast: autocast dtype of forward and loss, or ``None``.
        device: the model's device.
        meter: reset here, just before the first step.
    """
    if steps < 1 or len(batches) < warmup + steps:
        raise ValueError(f"need steps >= 1 and {warmup + steps} batches, got {len(batches)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    # The Hugging Face Trainer's default optimizer (adamw_torch_fused on CUDA, torch >= 2.8).
    optimizer = torch.optim.AdamW(
        params, lr=learning_rate, weight_decay=0.0, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type) if autocast is torch.float16 else None
    clock = _Clock(device)
    losses: list[torch.Tensor] = []
    meter.reset()
    wall_start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            clock.sync()
            wall_start = time.perf_counter()
        if step >= warmup:
            clock.mark()
        batch = batches[step]
        ctx = (
            torch.autocast(device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with ctx:
            loss = model(**batch.inputs).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    clock.mark()
    times = clock.intervals()
    wall = time.perf_counter() - wall_start
    alloc, reserved = meter.peak()
    return LoopResult(
        step_times=times,
        step_tokens=[b.tokens for b in batches[warmup : warmup + steps]],
        losses=torch.stack(losses).float().cpu().tolist(),
        peak_allocated=alloc,
        peak_reserved=reserved,
        wall_time=wall,
    )
