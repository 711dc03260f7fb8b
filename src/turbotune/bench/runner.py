"""Runs the points of a benchmark, each in its own process, and collects one row per point.

A point that cannot start is recorded without a process: ``skipped`` when it needs more GPUs
than the machine has, ``error`` when its turbotune config does not load (unknown key, unknown
plugin, missing package). Otherwise the worker runs under a timeout; its result JSON becomes
the row, and a process that dies without one (segfault, killed) is recorded from its exit
signal and the last line of its log. The run always goes on to the next point, and
``results.csv`` is rewritten after every point, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from turbotune.bench.report import write_csv
from turbotune.bench.scenarios import Point
from turbotune.errors import TurbotuneError

WORKER = "turbotune.bench.worker"


def available_gpus() -> int:
    """Visible CUDA devices (without creating a CUDA context in this process)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def point_slug(index: int, point: Point) -> str:
    """A file-name-safe id: ``003-hf-qlora-llama-3.1-8b-4x1024``."""
    text = f"{index:03d}-{point.scenario}-{point.label}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def preflight(point: Point, output_dir: str) -> str | None:
    """Why a turbotune point cannot start (its config fails to load or activate), else ``None``."""
    if point.builtin is not None:
        return None
    from turbotune.bench.setups import PointSettings, turbotune_config_dict
    from turbotune.bench.worker import error_line
    from turbotune.config import load_config
    from turbotune.plugins import activate

    s = point.settings
    settings = PointSettings(
        point.gradient_checkpointing, s.precision, s.learning_rate, s.lora,
        s.attn_implementation, s.seed, point.batch_size, output_dir,
    )  # fmt: skip
    try:
        activate(load_config(turbotune_config_dict(point.config or {}, settings)))
    except TurbotuneError as err:
        return error_line(err)
    return None


def worker_command(point: Point, spec: Path, result: Path) -> list[str]:
    """``python -m turbotune.bench.worker``, through torchrun for several GPUs."""
    if point.gpus <= 1:
        return [sys.executable, "-m", WORKER, str(spec), str(result)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={point.gpus}", "-m", WORKER, str(spec), str(result),
    ]  # fmt: skip


def last_line(log: Path) -> str:
    """The last non-empty line of a log (where a crash says what happened)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_process(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, bool]:
    """Run ``cmd`` with its output in ``log``; ``(exit code, timed out)``.

    The child gets its own process group so that a timeout (or Ctrl-C here) stops it and any
    torchrun ranks it started.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, True
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def outcome(
    code: int | None, timed_out: bool, result: Path, log: Path, timeout: float
) -> dict[str, Any]:
    """The row fields of a finished worker: its result JSON, or what its exit says."""
    if timed_out:
        return {"status": "timeout", "error": f"stopped after {timeout:.0f} s"}
    rank_files = sorted(result.parent.glob(result.name + ".rank*"))
    for path in [result, *rank_files]:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                break
    if code is not None and code < 0:
        name = (
            signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        )
        status = "oom" if -code == signal.SIGKILL else "error"
        why = " (host out of memory?)" if status == "oom" else ""
        return {"status": status, "error": f"killed by {name}{why}; log: {last_line(log)}"}
    return {"status": "error", "error": f"exit code {code}: {last_line(log)}"}


def base_row(point: Point) -> dict[str, Any]:
    """The identifying columns of a point's row."""
    return {
        "scenario": point.scenario,
        "baseline": point.is_baseline,
        "kind": point.builtin or "turbotune",
        "model": point.model,
        "batch_size": point.batch_size,
        "seq_len": point.seq_len,
        "gradient_checkpointing": point.gradient_checkpointing,
        "gpus": point.gpus,
        "warmup": point.settings.warmup,
        "steps": point.settings.steps,
    }


def run_point(index: int, point: Point, out_dir: Path, n_gpus: int) -> dict[str, Any]:
    """Run one point (or record why it cannot run); its row."""
    slug = point_slug(index, point)
    row = base_row(point)
    work = out_dir / "work" / slug
    if point.gpus > max(n_gpus, 1):
        return {**row, "status": "skipped", "error": f"needs {point.gpus} GPUs, {n_gpus} here"}
    why = preflight(point, str(work))
    if why is not None:
        return {**row, "status": "error", "error": why}
    for sub in ("points", "logs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    spec = out_dir / "points" / f"{slug}.spec.json"
    result = out_dir / "points" / f"{slug}.result.json"
    log = out_dir / "logs" / f"{slug}.log"
    for stale in [result, *result.parent.glob(result.name + ".rank*")]:
        stale.unlink(missing_ok=True)
    spec.write_text(json.dumps(point.spec(str(work)), indent=1))
    timeout = point.settings.timeout
    code, timed_out = run_process(worker_command(point, spec, result), log, timeout)
    return {
        **row,
        **outcome(code, timed_out, result, log, timeout),
        "log": str(log.relative_to(out_dir)),
    }


def run_all(
    points: list[Point],
    out_dir: Path,
    *,
    show_progress: bool = True,
    previous: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every point in order; rows (also written to ``out_dir/results.csv`` as they come).

    Args:
        points: in run order.
        out_dir: where logs, specs, results and ``results.csv`` go.
        show_progress: a progress bar on stderr.
        previous: rows of an earlier, interrupted run (``--resume``): a point found there with
            any status but ``timeout`` is not run again.
    """
    from turbotune.bench.report import point_key

    done = {(r["scenario"], point_key(r)): r for r in previous or [] if r["status"] != "timeout"}
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir.mkdir(parents=True, exist_ok=True)
    n_gpus = available_gpus()
    rows: list[dict[str, Any]] = []
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("bench", total=len(points))
        for i, point in enumerate(points):
            progress.update(task, description=f"{point.scenario} | {point.label}")
            row = done.get((point.scenario, point.key)) or run_point(i, point, out_dir, n_gpus)
            rows.append(row)
            write_csv(rows, out_dir / "results.csv")
            console.print(summary_line(row), markup=False)
            progress.advance(task)
    return rows


def summary_line(row: dict[str, Any]) -> str:
    """One line per finished point."""
    head = f"{row['scenario']:<24} {row['model']} {row['batch_size']}x{row['seq_len']}"
    head += "+gc" if row["gradient_checkpointing"] else ""
    if row["status"] != "ok":
        return f"{head}: {row['status'].upper()} {row.get('error', '')}"
    tps, mem, load = (
        row.get(k) or 0.0 for k in ("tokens_per_s", "peak_allocated_gib", "load_time_s")
    )
    return f"{head}: {tps:,.0f} tokens/s, peak {mem:.2f} GiB, load {load:.1f} s"
