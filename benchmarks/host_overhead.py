"""Is a benchmark point's training step bound by the host (Python, launches) or by the GPU?

    python benchmarks/host_overhead.py benchmarks/reference-workload.yaml turbotune-qlora-fused 4x1024

Builds the point as ``turbotune bench`` does, then for each timed step records the host's time
to enqueue the forward, the backward and the optimizer step and the time it then waits for the
GPU. A step whose host never waits is host-bound: the GPU idles while Python launches. It also
runs the same step on a tiny slice of the batch (one row, 64 tokens), where the GPU work is
negligible, so that step's time is the host's cost of one step; and it lists every operation
that synchronizes the host with the GPU (``torch.cuda.set_sync_debug_mode``), by source line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections import Counter

import torch


def _phases(parts, batch) -> list[float]:
    """Host seconds to enqueue forward, backward and optimizer, then to wait for the GPU."""
    net, opt, autocast = parts
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        loss = net(**batch.inputs).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]


class _Tiny:
    """The first row and ``n`` tokens of a batch (same model, negligible GPU work)."""

    def __init__(self, batch, n: int = 64) -> None:
        self.inputs = {
            k: (v[:1, :n] if torch.is_tensor(v) and v.dim() == 2 else v)
            for k, v in batch.inputs.items()
        }


def _sync_sites(parts, batch) -> Counter:
    """Source lines (innermost few frames) of every synchronizing CUDA call in one step."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = traceback.extract_stack()[:-1]
            keep = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames[-4:]]
            sites[" < ".join(reversed(keep))] += 1

    from profile_point import catch_syncs  # this folder is on sys.path when run as a script

    with catch_syncs(record):
        _phases(parts, batch)
    return sites


def _host_profile(parts, batches, top: int) -> None:
    """cProfile of the host's work in steps whose GPU work is negligible."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for b in batches:
        _phases(parts, b)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios")
    parser.add_argument("scenario")
    parser.add_argument("shape")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--cprofile", type=int, default=0, help="print cProfile's top N functions of tiny steps"
    )
    args = parser.parse_args(argv)

    from profile_point import build_point  # this folder is on sys.path when run as a script

    step, batches = build_point(args.scenarios, args.scenario, args.shape, 2 + args.steps)
    parts = step.parts
    for batch in batches[:2]:
        step(batch)
    rows = [_phases(parts, b) for b in batches[2:]]
    tiny = [_Tiny(b) for b in batches]
    for b in tiny[:2]:
        _phases(parts, b)
    tiny_rows = [_phases(parts, b) for b in tiny[2:]]
    names = ["forward", "backward", "optimizer", "wait for GPU", "step"]
    print(f"== {args.scenario} {args.shape}: host ms per phase (median of {len(rows)} steps)")
    for label, table in (("real batch", rows), ("1x64 slice", tiny_rows)):
        cells = "  ".join(
            f"{n} {1e3 * statistics.median(r[i] for r in table):7.1f}" for i, n in enumerate(names)
        )
        print(f"  {label:11s} {cells}")
    if args.cprofile:
        _host_profile(parts, tiny[2:], args.cprofile)
    print("synchronizing calls in one step (count, innermost frame first):")
    for site, count in _sync_sites(parts, batches[-1]).most_common(20):
        print(f"  {count:4d}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
