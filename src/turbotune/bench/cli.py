"""``turbotune bench``: the command-line verb (wired into :mod:`turbotune.cli`).

::

    turbotune bench benchmarks/reference-workload.yaml --out bench-out/ref
    turbotune bench SCENARIOS.yaml --only turbotune-qlora --steps 5 --warmup 2
    turbotune bench SCENARIOS.yaml --list                        # the points, without running
    turbotune bench --report bench-out/ref --compare benchmarks/results/h100_202611.csv

Also runnable as ``python -m turbotune.bench.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from turbotune.errors import TurbotuneError

COMPARE_THRESHOLD = 0.10


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` verb to a ``add_subparsers()`` object; sets ``fn=run_bench_command``."""
    help_text = (
        "measure scenarios side by side (each point in its own process): CSV, Markdown, plots"
    )
    p = subparsers.add_parser("bench", help=help_text, description=help_text)
    p.add_argument("scenarios", nargs="?", help="scenario file (YAML: defaults + scenarios)")
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    p.add_argument(
        "--only", help="comma-separated scenario names to run (the baseline always runs)"
    )
    p.add_argument("--steps", type=int, help="timed steps of every scenario (overrides the file)")
    p.add_argument(
        "--warmup", type=int, help="warm-up steps of every scenario (overrides the file)"
    )
    p.add_argument(
        "--compare", metavar="REF.csv", help="flag points that moved >10%% from this results.csv"
    )
    p.add_argument(
        "--resume", action="store_true",
        help="keep the points already in OUT/results.csv (all but timeouts); run the rest",
    )  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the points in run order and exit")
    p.add_argument(
        "--report", metavar="DIR",
        help="rebuild results.md and the plots (and --compare) from DIR/results.csv; run nothing",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(fn=run_bench_command)
    return p


def run_bench_command(args: argparse.Namespace) -> int:
    """Run (or list, or report on) a benchmark; 0 when every point ran or was skipped, 1 when
    some point failed, 3 when --compare flagged a change."""
    if args.report:
        out = Path(args.report)
        if not (out / "results.csv").is_file():
            raise TurbotuneError(f"--report: {out}/results.csv not found")
        from turbotune.bench.report import read_csv

        rows = read_csv(out / "results.csv")
        env_path = out / "env.json"
        env = json.loads(env_path.read_text()) if env_path.is_file() else {}
        return _finish(rows, env, out, args.compare)
    if not args.scenarios:
        raise TurbotuneError("name a scenario file (or use --report DIR)")
    from turbotune.bench.scenarios import expand, load_scenarios

    scenarios = load_scenarios(args.scenarios, steps=args.steps, warmup=args.warmup)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    points = expand(scenarios, only)
    if args.list:
        for i, p in enumerate(points):
            kind = p.builtin or "turbotune"
            print(
                f"{i:>3}. {p.scenario:<28} {kind:<14} {p.label}"
                + ("  [baseline]" if p.is_baseline else "")
            )
        return 0
    from turbotune.bench.env import collect_env
    from turbotune.bench.runner import run_all

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = collect_env(getattr(args, "argv", None))
    env["scenario_file"] = str(args.scenarios)
    previous = None
    if args.resume and (out / "results.csv").is_file():
        from turbotune.bench.report import read_csv

        previous = read_csv(out / "results.csv")
    rows = run_all(points, out, show_progress=not args.no_progress, previous=previous)
    return _finish(rows, env, out, args.compare)


def _finish(
    rows: list[dict[str, Any]], env: dict[str, Any], out: Path, compare_to: str | None
) -> int:
    """Write env.json, results.csv/md, plots and the comparison; print the table; exit code."""
    from turbotune.bench.env import add_device
    from turbotune.bench.plots import write_plots
    from turbotune.bench.report import (
        compare,
        markdown_table,
        read_csv,
        write_compare,
        write_csv,
        write_markdown,
    )

    env = add_device(env, rows)
    (out / "env.json").write_text(json.dumps(env, indent=2, default=str))
    write_csv(rows, out / "results.csv")
    write_markdown(rows, env, out / "results.md")
    try:
        write_plots(rows, out)
        plots = "throughput.png, memory.png, loss.png, "
    except ImportError:  # matplotlib is an optional dependency
        plots = ""
        print("no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(markdown_table(rows))
    print(f"\nwritten to {out}/: results.csv, results.md, {plots}env.json")
    code = 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1
    if compare_to:
        ref = Path(compare_to)
        if not ref.is_file():
            raise TurbotuneError(f"--compare: {ref} not found")
        changes, missing = compare(rows, read_csv(ref), COMPARE_THRESHOLD)
        print("\n" + write_compare(changes, missing, ref, out / "compare.md", COMPARE_THRESHOLD))
        if changes:
            code = 3
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m turbotune.bench.cli``: the verb on its own, through the one CLI entry."""
    from turbotune.cli import main as cli_main

    words = sys.argv[1:] if argv is None else argv
    return cli_main(["bench", *words])


if __name__ == "__main__":
    sys.exit(main())
