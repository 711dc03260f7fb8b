"""Benchmark outputs: ``results.csv``, ``results.md`` (with ratios to the baseline), ``compare.md``.

Ratios: each row's tokens/s and peak allocated memory divided by those of the baseline
scenario at the same point (model, batch, sequence length, checkpointing, GPUs). A comparison
with a reference CSV flags every point whose tokens/s or peak memory moved by more than the
threshold (10% by default) or whose status changed.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Columns of results.csv, in order.
COLUMNS = (
    "scenario", "baseline", "kind", "model", "batch_size", "seq_len", "gradient_checkpointing",
    "gpus", "status", "error", "tokens_per_s", "tokens_per_s_per_gpu", "step_time_median_s",
    "step_time_mean_s", "wall_time_s", "tokens_per_step", "seq_len_effective", "mfu", "hfu",
    "flops_per_token", "peak_flops", "peak_allocated_gib", "peak_reserved_gib", "load_time_s",
    "trainable_params", "param_gib", "precision", "device_name", "world_size", "warmup",
    "steps", "losses", "log",
)  # fmt: skip

_INTS = {"batch_size", "seq_len", "gpus", "trainable_params", "world_size", "warmup", "steps"}
_BOOLS = {"baseline", "gradient_checkpointing"}
_TEXT = {"scenario", "kind", "model", "status", "error", "precision", "device_name", "log"}

Key = tuple[str, int, int, bool, int]


def point_key(row: dict[str, Any]) -> Key:
    return (row["model"], int(row["batch_size"]), int(row["seq_len"]),
            bool(row["gradient_checkpointing"]), int(row["gpus"]))  # fmt: skip


def point_label(key: Key) -> str:
    model, batch, seq, gc, gpus = key
    return f"{model} {batch}x{seq}" + ("+gc" if gc else "") + (f" x{gpus}gpu" if gpus > 1 else "")


# --- CSV ------------------------------------------------------------------------------------


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per point; losses as a JSON list; missing values empty."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = {k: row.get(k) for k in COLUMNS}
            out["losses"] = json.dumps([round(x, 6) for x in row.get("losses") or []])
            writer.writerow({k: ("" if v is None else v) for k, v in out.items()})


def _parse(key: str, value: str) -> Any:
    if key in _TEXT:
        return value
    if value == "":
        return None
    if key in _BOOLS:
        return value.strip().lower() in ("true", "1", "yes")
    if key == "losses":
        return json.loads(value)
    if key in _INTS:
        return int(float(value))
    return float(value)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.csv written by :func:`write_csv` (typed back)."""
    with Path(path).open(newline="") as f:
        return [
            {k: _parse(k, v or "") for k, v in row.items() if k is not None}
            for row in csv.DictReader(f)
        ]


# --- results.md -----------------------------------------------------------------------------


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("status") == "ok"


def baselines_by_point(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    return {point_key(r): r for r in rows if r.get("baseline")}


def ratio(row: dict[str, Any], base: dict[str, Any] | None, field: str) -> float | None:
    """``row[field] / base[field]`` when both points ran, else ``None``."""
    if not (_ok(row) and _ok(base)) or not base.get(field):
        return None
    return row[field] / base[field]


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table grouped by point, with ratios to the baseline."""
    base = baselines_by_point(rows)
    head = (
        "| point | scenario | status | tokens/s | vs base | tokens/s/GPU | MFU | peak alloc GiB "
        "| vs base | reserved GiB | step s | load s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    keys = list(dict.fromkeys(point_key(r) for r in rows))
    for key in keys:
        for row in (r for r in rows if point_key(r) == key):
            b = base.get(key)
            status = row["status"] if _ok(row) else f"**{row['status']}**: {row.get('error') or ''}"
            name = row["scenario"] + (" (baseline)" if row.get("baseline") else "")
            lines.append(
                f"| {point_label(key)} | {name} | {status.replace('|', '/')} "
                f"| {_fmt(row.get('tokens_per_s'), ',.0f')} "
                f"| {_fmt(ratio(row, b, 'tokens_per_s'), '.2f', 'x')} "
                f"| {_fmt(row.get('tokens_per_s_per_gpu'), ',.0f')} "
                f"| {_fmt(row.get('mfu') and 100 * row['mfu'], '.1f', '%')} "
                f"| {_fmt(row.get('peak_allocated_gib'), '.2f')} "
                f"| {_fmt(ratio(row, b, 'peak_allocated_gib'), '.2f', 'x')} "
                f"| {_fmt(row.get('peak_reserved_gib'), '.2f')} "
                f"| {_fmt(row.get('step_time_median_s'), '.3f')} "
                f"| {_fmt(row.get('load_time_s'), '.1f')} |"
            )
    return "\n".join(lines)


def write_markdown(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> None:
    """``results.md``: the environment in a few lines, then :func:`markdown_table`."""
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    lines = [
        "# Benchmark results",
        "",
        f"- date: {env.get('date', '-')}; device: {env.get('device_name', '-')} "
        f"(driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')})",
        f"- turbotune commit: {env.get('commit', '-')}; {versions}",
        f"- command: `{env.get('command', '-')}`",
        "- tokens/s counts non-padding tokens; MFU is against the measured bf16 peak "
        f"({_fmt(env.get('peak_flops') and env['peak_flops'] / 1e12, '.0f', ' TFLOP/s')}), "
        "useful FLOPs only (no recomputation); ratios are to the baseline at the same point.",
        "",
        markdown_table(rows),
        "",
    ]
    path.write_text("\n".join(lines))


# --- comparison -----------------------------------------------------------------------------


@dataclass
class Change:
    """A point that moved against the reference."""

    scenario: str
    point: str
    metric: str
    reference: Any
    current: Any
    change: float | None
    """Relative change (``current / reference - 1``), ``None`` for a status change."""

    def line(self) -> str:
        if self.change is None:
            return (
                f"{self.scenario} @ {self.point}: {self.metric} {self.reference} -> {self.current}"
            )
        return (
            f"{self.scenario} @ {self.point}: {self.metric} {self.reference:,.2f} -> "
            f"{self.current:,.2f} ({self.change:+.1%})"
        )


def compare(
    rows: list[dict[str, Any]], reference: list[dict[str, Any]], threshold: float = 0.10
) -> tuple[list[Change], list[str]]:
    """Points that moved more than ``threshold`` (tokens/s, peak allocated memory) or changed
    status; and the labels of points absent from the reference."""
    ref = {(r["scenario"], point_key(r)): r for r in reference}
    changes: list[Change] = []
    missing: list[str] = []
    for row in rows:
        key = point_key(row)
        old = ref.get((row["scenario"], key))
        label = point_label(key)
        if old is None:
            missing.append(f"{row['scenario']} @ {label}")
            continue
        if old["status"] != row["status"]:
            changes.append(
                Change(row["scenario"], label, "status", old["status"], row["status"], None)
            )
            continue
        if not _ok(row):
            continue
        for metric in ("tokens_per_s", "peak_allocated_gib"):
            before, now = old.get(metric), row.get(metric)
            if before and now is not None and abs(now / before - 1) > threshold:
                changes.append(
                    Change(row["scenario"], label, metric, before, now, now / before - 1)
                )
    return changes, missing


def write_compare(
    changes: list[Change], missing: list[str], reference: Path, path: Path, threshold: float
) -> str:
    """``compare.md``; returns its text."""
    lines = [
        f"# Comparison with {reference}",
        "",
        f"Threshold: {threshold:.0%} on tokens/s and peak allocated memory.",
        "",
    ]
    if changes:
        lines += [f"{len(changes)} point(s) moved:", ""] + [f"- {c.line()}" for c in changes]
    else:
        lines.append("No point moved beyond the threshold.")
    if missing:
        lines += ["", "Not in the reference:", ""] + [f"- {m}" for m in missing]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
