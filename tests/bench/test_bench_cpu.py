"""``turbotune bench`` end to end on CPU: two scenarios in their own processes, a crashing
point, a skipped multi-GPU point; the CSV, the Markdown ratios, the plots, env.json; then a
comparison with a doctored reference."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from turbotune.bench.cli import main
from turbotune.bench.report import read_csv

SCENARIOS = {
    "baseline": "hf-lora",
    "defaults": {
        "models": ["llama-tiny"],
        "shapes": ["2x32"],
        "warmup": 2,
        "steps": 3,
        "precision": "fp32",
        "timeout": 300,
    },
    "scenarios": [
        {"name": "hf-lora"},
        {"name": "turbotune-lora", "config": {"adapter": {"method": "lora"}}},
        {"name": "broken-plugin", "config": {"plugins": {"no_such_plugin": {}}}},
        {"name": "hf-lora-2gpu", "builtin": "hf-lora", "gpus": [2]},
    ],
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, one_thread_env):
    root = tmp_path_factory.mktemp("bench")
    scenario_file = root / "tiny.yaml"
    scenario_file.write_text(yaml.safe_dump(SCENARIOS))
    out = root / "out"
    code = main([str(scenario_file), "--out", str(out), "--no-progress"])
    return code, out


def _rows(out):
    return {r["scenario"]: r for r in read_csv(out / "results.csv")}


def test_points_run_fail_and_skip_without_stopping_the_run(bench_run):
    code, out = bench_run
    assert code == 1  # a point failed, the others still ran
    rows = _rows(out)
    assert list(rows) == ["hf-lora", "hf-lora-2gpu", "turbotune-lora", "broken-plugin"]
    assert rows["broken-plugin"]["status"] == "error"
    assert "no_such_plugin" in rows["broken-plugin"]["error"]
    assert rows["hf-lora-2gpu"]["status"] == "skipped"
    assert "needs 2 GPUs" in rows["hf-lora-2gpu"]["error"]
    for name in ("hf-lora", "turbotune-lora"):
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        assert row["tokens_per_step"] == 64 and row["tokens_per_s"] > 0
        assert row["step_time_median_s"] > 0 and row["peak_allocated_gib"] > 0
        assert row["load_time_s"] > 0 and row["flops_per_token"] > 0
        assert len(row["losses"]) == 5  # 2 warm-up + 3 timed
        assert (out / row["log"]).is_file()
    # Same weights, adapters and batches in both processes: the same losses.
    a, b = rows["hf-lora"]["losses"], rows["turbotune-lora"]["losses"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)


def test_markdown_has_ratios_and_the_crash(bench_run):
    _, out = bench_run
    rows = _rows(out)
    text = (out / "results.md").read_text()
    lines = {
        line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| llama")
    }
    assert "| 1.00x |" in lines["hf-lora (baseline)"]
    speedup = rows["turbotune-lora"]["tokens_per_s"] / rows["hf-lora"]["tokens_per_s"]
    memory = rows["turbotune-lora"]["peak_allocated_gib"] / rows["hf-lora"]["peak_allocated_gib"]
    assert f"| {speedup:.2f}x |" in lines["turbotune-lora"]
    assert f"| {memory:.2f}x |" in lines["turbotune-lora"]
    assert "**error**: ConfigError" in lines["broken-plugin"]
    assert "**skipped**" in lines["hf-lora-2gpu"]


def test_plots_and_environment(bench_run):
    import matplotlib.image

    _, out = bench_run
    for name in ("throughput.png", "memory.png", "loss.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100, (name, height, width)
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["packages"]["peft"]
    assert env["device_name"].startswith("cpu") and "--out" in env["command"]


def test_compare_flags_a_doctored_reference(bench_run, tmp_path, capsys):
    _, out = bench_run
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["scenario"] == "turbotune-lora":
            row["tokens_per_s"] = str(float(row["tokens_per_s"]) * 1.5)  # now 33% slower
        if row["scenario"] == "hf-lora":
            row["peak_allocated_gib"] = str(float(row["peak_allocated_gib"]) * 1.05)  # within 10%
    ref = tmp_path / "ref.csv"
    with ref.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main(["--report", str(out), "--compare", str(ref)])
    assert code == 3
    text = (out / "compare.md").read_text()
    flagged = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(flagged) == 1, text
    assert (
        "turbotune-lora" in flagged[0] and "tokens_per_s" in flagged[0] and "-33.3%" in flagged[0]
    )
    assert "1 point(s) moved" in capsys.readouterr().out
    # against itself nothing moves
    assert main(["--report", str(out), "--compare", str(out / "results.csv")]) == 1
    assert "No point moved" in (out / "compare.md").read_text()
