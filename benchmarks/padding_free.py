"""Padding-free vs padded on GSM8K and Alpaca lengths, fused ops off and on: run and summarize.

    python benchmarks/padding_free.py --out bench-out/padding-free
    python benchmarks/padding_free.py --out bench-out/padding-free --report-only   # tables only

Runs ``benchmarks/padding-free-gsm8k.yaml`` and ``benchmarks/padding-free-alpaca.yaml`` through
``turbotune bench`` (one process per point, ``--resume`` skips finished points), then writes
``<out>/padding_free.md``: per dataset and shape, padding-free tokens/s over padded tokens/s with
fused ops off (``padding-free / padded``) and on (``padding-free-fused / padded-fused``), and
whether each reaches the issue's 1.6x bar. Extra arguments go to ``turbotune bench``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASETS = ("gsm8k", "alpaca")
PAIRS = {
    "fused off": ("padding-free", "padded"),
    "fused on": ("padding-free-fused", "padded-fused"),
}
BAR = 1.6


def summarize(out: Path) -> str:
    """The Markdown table of the ratios from ``<out>/<dataset>/results.csv``."""
    from turbotune.bench.report import read_csv

    lines = [
        "| dataset | shape | fused | padded tok/s | padding-free tok/s | ratio | >= 1.6x |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for dataset in DATASETS:
        csv = out / dataset / "results.csv"
        if not csv.is_file():
            lines.append(f"| {dataset} | - | - | - | - | - | no results ({csv}) |")
            continue
        rows = read_csv(csv)
        shapes = dict.fromkeys(_shape(r) for r in rows)
        for shape in shapes:
            by_name = {r["scenario"]: r for r in rows if _shape(r) == shape}
            for label, (fast, slow) in PAIRS.items():
                lines.append(_line(dataset, shape, label, by_name.get(slow), by_name.get(fast)))
    return "\n".join(lines) + "\n"


def _shape(row: dict) -> str:
    gc = "+gc" if row.get("gradient_checkpointing") else ""
    return f"{row['batch_size']}x{row['seq_len']}{gc}"


def _line(dataset: str, shape: str, label: str, slow: dict | None, fast: dict | None) -> str:
    ok = slow and fast and slow.get("status") == "ok" and fast.get("status") == "ok"
    if not ok:
        why = "; ".join(
            f"{r['scenario']}: {r['status']} {r.get('error', '')}" for r in (slow, fast) if r
        )
        return f"| {dataset} | {shape} | {label} | - | - | - | {why or 'missing'} |"
    ratio = fast["tokens_per_s"] / slow["tokens_per_s"]
    return (
        f"| {dataset} | {shape} | {label} | {slow['tokens_per_s']:,.0f} | "
        f"{fast['tokens_per_s']:,.0f} | {ratio:.2f}x | {'yes' if ratio >= BAR else 'NO'} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--report-only", action="store_true")
    args, extra = parser.parse_known_args(argv)
    from turbotune.bench.cli import main as bench

    code = 0
    if not args.report_only:
        for dataset in DATASETS:
            scenario = HERE / f"padding-free-{dataset}.yaml"
            words = [str(scenario), "--out", str(args.out / dataset), "--resume", *extra]
            code = max(code, bench(words))
    table = summarize(args.out)
    (args.out / "padding_free.md").write_text(table)
    print(table)
    return code


if __name__ == "__main__":
    sys.exit(main())
