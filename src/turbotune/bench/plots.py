"""Benchmark plots (matplotlib, Agg backend: no display needed).

* ``throughput.png`` and ``memory.png``: one group of bars per point, one bar per scenario;
  a point that did not run shows its status in place of the bar.
* ``loss.png``: the loss of every step (warm-up included) per point, every scenario overlaid,
  the baseline dashed: runs that start from the same weights and batches should overlap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from turbotune.bench.report import point_key, point_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scenarios(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["scenario"] for r in rows))


def bar_chart(rows: list[dict[str, Any]], field: str, ylabel: str, title: str, path: Path) -> None:
    """Grouped bars of ``field``: groups = points, bars = scenarios."""
    plt = _pyplot()
    keys = list(dict.fromkeys(point_key(r) for r in rows))
    names = _scenarios(rows)
    by = {(r["scenario"], point_key(r)): r for r in rows}
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) * max(1, len(names)) ** 0.5), 4.5))
    for j, name in enumerate(names):
        xs, heights, notes = [], [], []
        for i, key in enumerate(keys):
            row = by.get((name, key))
            if row is None:
                continue
            ok = row["status"] == "ok" and row.get(field) is not None
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            heights.append(row[field] if ok else 0.0)
            notes.append(None if ok else row["status"])
        bars = ax.bar(xs, heights, width, label=name)
        for bar, note in zip(bars, notes):
            if note:
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                            va="bottom", rotation=90, fontsize=8, color="crimson")  # fmt: skip
    ax.set_xticks(
        range(len(keys)), [point_label(k) for k in keys], rotation=15, ha="right", fontsize=8
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss per step, one panel per point, scenarios overlaid (baseline dashed)."""
    plt = _pyplot()
    keys = list(dict.fromkeys(point_key(r) for r in rows))
    cols = min(3, max(1, len(keys)))
    nrows = math.ceil(len(keys) / cols) if keys else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.5 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for row in (r for r in rows if point_key(r) == key and r.get("losses")):
            # the baseline on top, dashed, so that a matching curve under it stays visible
            style = (
                {"linestyle": "--", "color": "black", "zorder": 3} if row.get("baseline") else {}
            )
            ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["scenario"], **style)
            warmup = row.get("warmup") or 0
            if warmup:
                ax.axvspan(0.5, warmup + 0.5, color="grey", alpha=0.1)
        ax.set_title(point_label(key), fontsize=9)
        ax.set_xlabel("step (shaded: warm-up)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The three PNG files; their paths."""
    paths = [out_dir / "throughput.png", out_dir / "memory.png", out_dir / "loss.png"]
    bar_chart(rows, "tokens_per_s", "tokens/s (non-padding)", "Training throughput", paths[0])
    bar_chart(rows, "peak_allocated_gib", "GiB", "Peak allocated memory", paths[1])
    loss_chart(rows, paths[2])
    return paths
