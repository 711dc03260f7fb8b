"""Host and GPU memory peaks of this process, for loading and training reports."""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["memory_report"]


def _host_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _host_now_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # psutil is optional: /proc has the same number on Linux
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def memory_report() -> dict[str, float]:
    """``{"host_peak_gib", "host_now_gib", "gpu_peak_gib", "gpu_reserved_peak_gib"}``."""
    gib = float(1 << 30)
    out = {"host_peak_gib": _host_peak_bytes() / gib, "host_now_gib": _host_now_bytes() / gib}
    if torch.cuda.is_available():
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / gib
        out["gpu_reserved_peak_gib"] = torch.cuda.max_memory_reserved() / gib
    return out
