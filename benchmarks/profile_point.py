"""Profile one benchmark point: where does a training step's GPU time go?

    python benchmarks/profile_point.py benchmarks/reference-workload.yaml turbotune-qlora-fused 4x1024

Builds the point exactly as ``turbotune bench`` does, runs warm-up steps, then profiles a few
steps with ``torch.profiler`` and prints the kernels by total CUDA time (and writes a Chrome
trace next to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios")
    parser.add_argument("scenario")
    parser.add_argument("shape", help="e.g. 4x1024 or 8x1024+gc")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    parser.add_argument(
        "--gaps", action="store_true", help="report GPU idle gaps (records Python stacks)"
    )
    parser.add_argument(
        "--busy", action="store_true", help="report GPU busy/idle time only (no Python stacks)"
    )
    parser.add_argument("--sort", default="cuda_time_total", help="key_averages sort key")
    parser.add_argument(
        "--sync-debug", action="store_true", help="print the stack of every host sync in a step"
    )
    parser.add_argument(
        "--shapes", action="store_true", help="eager layers, ops grouped by input shapes"
    )
    parser.add_argument(
        "--categories", action="store_true", help="also sum kernel time by kind (GEMM, ...)"
    )
    args = parser.parse_args(argv)

    step, batches = build_point(
        args.scenarios, args.scenario, args.shape, 2 + args.steps, args.model
    )

    if args.shapes:
        from ab_point import _switch

        _switch(step.parts[0], graphs=False)
    for batch in batches[:2]:
        step(batch)
    torch.cuda.synchronize()
    if args.sync_debug:
        _sync_stacks(step, batches[2])
    # Wall time only: process time would count the final synchronize's spin as host work.
    import time

    wall = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    torch.cuda.synchronize()
    print(f"unprofiled: {1e3 * (time.perf_counter() - wall) / (len(batches) - 2):.1f} ms/step")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(
        activities=acts, with_stack=args.gaps, record_shapes=args.shapes
    ) as prof:
        for batch in batches[2:]:
            step(batch)
        torch.cuda.synchronize()
    print(f"== {args.scenario} {args.shape}: {args.steps} steps")
    print(
        prof.key_averages(group_by_input_shape=args.shapes).table(
            sort_by=args.sort, row_limit=args.rows, max_name_column_width=70
        )
    )
    if args.categories:
        category_report(prof, args.steps)
    trace = args.trace or ("/tmp/profile-point.json" if args.gaps or args.busy else None)
    if trace:
        prof.export_chrome_trace(trace)
    if args.gaps or args.busy:
        gap_report(trace)
    return 0


def _sync_stacks(step: Callable[[Any], torch.Tensor], batch: Any) -> None:
    """One step with ``torch.cuda.set_sync_debug_mode("warn")``: each synchronizing call's stack."""
    import traceback

    seen: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        seen[stack] = seen.get(stack, 0) + 1

    with catch_syncs(show):
        step(batch)
    print(f"== {sum(seen.values())} synchronizing calls in one step")
    for stack, n in seen.items():
        print(f"-- {n}x\n{stack}")


@contextlib.contextmanager
def catch_syncs(show: Callable[..., None]) -> Iterator[None]:
    """Within: every CUDA call that synchronizes the host warns (``set_sync_debug_mode``), and
    ``show`` (a ``warnings.showwarning``) receives each warning, called from inside the
    synchronizing call so that its stack names the call site."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Kernel name patterns -> kind, first match wins (names of torch 2.11 / triton 3.6 on an H100).
_KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("nf4 dequant", ("dequant",)),
    ("cross-entropy", ("_fwd_kernel", "cross_entropy", "logsumexp")),
    ("rms norm", ("rms",)),
    ("rope", ("rope", "rotary")),
    ("swiglu", ("swiglu", "glu")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("GEMM", ("gemm", "nvjet", "sm90_xmma", "cutlass", "splitk", "splitK")),
    ("reduce", ("reduce",)),
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat", "Memcpy", "Memset")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def category_report(prof: Any, steps: int) -> None:
    """Sum device kernel time per kind of kernel, in ms per step."""
    sums: dict[str, float] = {}
    other: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        kind = next((k for k, pats in _KINDS if any(p in evt.key for p in pats)), None)
        if kind is None:
            other[evt.key] = other.get(evt.key, 0.0) + us
            kind = "other"
        sums[kind] = sums.get(kind, 0.0) + us
    total = sum(sums.values())
    print(f"== device time by kind (ms per step; total {total / 1e3 / steps:.1f})")
    for kind, us in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:14s} {us / 1e3 / steps:8.2f}")
    for name, us in sorted(other.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    other: {us / 1e3 / steps:7.2f}  {name[:90]}")


def build_point(
    scenarios: str, scenario: str, shape: str, n_batches: int, model: str | None = None
) -> tuple[Callable[[Any], torch.Tensor], list[Any]]:
    """Build one benchmark point exactly as ``turbotune bench`` does (also for ``ab_point.py``).

    Returns:
        ``(step, batches)``: ``step(batch)`` runs forward, backward and a fused AdamW step and
        returns the detached loss (``step.parts`` is ``(model, optimizer, autocast dtype)``);
        ``n_batches`` batches on the GPU.

    Raises:
        SystemExit: if no point of the file is ``scenario`` at ``shape`` (and ``model``).
    """
    from turbotune.bench.models import resolve_model_config
    from turbotune.bench.scenarios import expand, load_scenarios
    from turbotune.bench.worker import _batches, _prepare

    points = [
        p
        for p in expand(load_scenarios(scenarios))
        if p.scenario == scenario
        and p.label.split(" ")[1] == shape
        and (model is None or p.model == model)
    ]
    if not points:
        raise SystemExit(f"no point {scenario} {shape} in {scenarios}")
    spec = points[0].spec("/tmp/profile-point")
    device = torch.device("cuda")
    config = resolve_model_config(spec["model"])
    prepared = _prepare(spec, config, device)
    net = prepared.model
    batches = _batches(spec, config.vocab_size, n_batches, 0, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)

    def step(batch: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=prepared.autocast, enabled=prepared.autocast is not None):
            loss = net(**batch.inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.parts = (net, opt, prepared.autocast)  # for benchmarks/host_overhead.py's phases
    return step, batches


def gap_report(trace_path: str, top: int = 12) -> None:
    """GPU idle time in a Chrome trace, and what the CPU was doing when launching resumed.

    A gap is time between consecutive kernels on the GPU. For the largest gaps, print the
    kernel that ended the gap and the innermost Python frames around its launch, plus any
    synchronizing runtime call (``cudaStreamSynchronize``, device-to-host copies) just before.
    """
    import bisect
    import json

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    runtime = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    syncs = sorted(
        (
            e
            for e in events
            if e.get("cat") == "cuda_runtime"
            and any(s in e["name"] for s in ("Synchronize", "Memcpy", "EventQuery"))
        ),
        key=lambda e: e["ts"],
    )
    py = sorted((e for e in events if e.get("cat") == "python_function"), key=lambda e: e["ts"])
    py_starts = [e["ts"] for e in py]
    if not kernels:
        print("no kernels in the trace")
        return
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy, gaps, end = 0.0, [], kernels[0]["ts"]
    for k in kernels:
        if k["ts"] > end:
            gaps.append((k["ts"] - end, end, k))
        busy += max(0.0, k["ts"] + k["dur"] - max(end, k["ts"]))
        end = max(end, k["ts"] + k["dur"])
    idle = span - busy
    print(
        f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms "
        f"({100 * idle / span:.1f}%), gaps > 20 us: {sum(1 for g in gaps if g[0] > 20)} "
        f"summing {sum(g[0] for g in gaps if g[0] > 20) / 1e3:.1f} ms"
    )
    n_sync = {}
    for s in syncs:
        n_sync[s["name"]] = n_sync.get(s["name"], 0) + 1
    print("sync-like runtime calls:", n_sync)
    by_source: dict[str, float] = {}
    for k in kernels:
        launch = runtime.get(k["args"].get("correlation"))
        frame = "?"
        if launch is not None:
            t = launch["ts"]
            i = bisect.bisect_right(py_starts, t)
            for e in reversed(py[max(0, i - 400) : i]):
                if e["ts"] + e["dur"] >= t and (
                    "turbotune/" in e["name"]
                    or "site-packages/transformers/" in e["name"]
                    or "optim/" in e["name"]
                ):
                    frame = e["name"][-70:]
                    break
        key = f"{frame} | {k['name'][:40]}"
        by_source[key] = by_source.get(key, 0.0) + k["dur"]
    _python_self_times(events)
    print("GPU time by launching source line (ms per profiled run):")
    for key, dur in sorted(by_source.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {dur / 1e3:8.2f}  {key}")
    for dur, _start, k in sorted(gaps, key=lambda g: -g[0])[:top]:
        launch = runtime.get(k["args"].get("correlation"))
        where = []
        if launch is not None:
            t = launch["ts"]
            i = bisect.bisect_right(py_starts, t)
            frames = [e for e in py[max(0, i - 400) : i] if e["ts"] + e["dur"] >= t]
            where = [e["name"][:60] for e in frames[-4:]]
        j = bisect.bisect_right([s["ts"] for s in syncs], k["ts"])
        before = syncs[j - 1]["name"] if j else "-"
        print(
            f"  gap {dur:8.0f} us before {k['name'][:50]!r}; last sync call {before}; "
            f"launched in {' > '.join(where)}"
        )


def _python_self_times(events: list[dict], top: int = 45) -> None:
    """Self CPU time of each Python function and aten op (children excluded), per thread."""
    cats = ("python_function", "cpu_op", "cuda_runtime", "cuda_driver")
    by_tid: dict = {}
    for e in events:
        if e.get("cat") in cats and "dur" in e:
            by_tid.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    self_time: dict[str, float] = {}
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, event, child time]
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                _close(stack.pop(), self_time)
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e, 0.0])
        while stack:
            _close(stack.pop(), self_time)
    print("self CPU time by Python function / op (ms per profiled run, all threads):")
    for name, t in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t / 1e3:8.2f}  {name[-100:]}")


def _close(entry: list, self_time: dict[str, float]) -> None:
    _end, e, child = entry
    key = f"[{e['cat'][:6]}] {e['name']}"
    self_time[key] = self_time.get(key, 0.0) + e["dur"] - child


if __name__ == "__main__":
    sys.exit(main())
