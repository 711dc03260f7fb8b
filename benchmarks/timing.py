"""CUDA-event timing shared by the micro-benchmarks in this folder.

from timing import time_ms   # the scripts put this folder on sys.path (run as scripts)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

__all__ = ["time_ms"]

_SCRATCH: list[torch.Tensor] = []


def time_ms(
    fn: Callable[[], object], repeats: int = 30, warmup: int = 5, cold: bool = True
) -> float:
    """Median CUDA-event time of ``fn`` in ms, after ``warmup`` calls.

    ``cold`` evicts the L2 (50 MB on an H100) before each repeat by writing a 256 MB buffer
    outside the timed window: a memory-bound op in a training step finds its input in HBM,
    not in a cache warmed by the previous repeat.
    """
    if cold and not _SCRATCH:
        _SCRATCH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if cold:
            _SCRATCH[0].zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
