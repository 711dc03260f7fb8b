"""Reports, comparison with a reference, and how the runner records processes that fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from turbotune.bench.report import compare, markdown_table, read_csv, write_csv
from turbotune.bench.runner import outcome, run_process


def _row(
    scenario: str,
    tps: float | None,
    mem: float | None,
    *,
    base: bool = False,
    status: str = "ok",
    seq: int = 1024,
) -> dict:
    return {
        "scenario": scenario, "baseline": base, "kind": "x", "model": "m", "batch_size": 4,
        "seq_len": seq, "gradient_checkpointing": False, "gpus": 1, "status": status,
        "error": "" if status == "ok" else "OutOfMemoryError: CUDA out of memory",
        "tokens_per_s": tps, "peak_allocated_gib": mem, "mfu": 0.5 if tps else None,
        "losses": [2.5, 2.25] if tps else [], "warmup": 1, "steps": 1,
    }  # fmt: skip


ROWS = [
    _row("base", 1000.0, 20.0, base=True),
    _row("fast", 1500.0, 15.0),
    _row("broken", None, None, status="oom"),
    _row("base", 500.0, 40.0, base=True, seq=4096),
    _row("fast", 800.0, 30.0, seq=4096),
]


def test_markdown_ratios_against_the_same_point():
    table = markdown_table(ROWS)
    lines = {
        (line.split("|")[1].strip(), line.split("|")[2].strip()): line
        for line in table.splitlines()[2:]
    }
    assert "| 1.50x |" in lines[("m 4x1024", "fast")] and "| 0.75x |" in lines[("m 4x1024", "fast")]
    assert "| 1.60x |" in lines[("m 4x4096", "fast")] and "| 0.75x |" in lines[("m 4x4096", "fast")]
    assert "**oom**: OutOfMemoryError" in lines[("m 4x1024", "broken")]
    assert "(baseline)" in lines[("m 4x1024", "base (baseline)")]


def test_csv_round_trip(tmp_path):
    write_csv(ROWS, tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert back[1]["tokens_per_s"] == 1500.0 and back[1]["losses"] == [2.5, 2.25]
    assert back[0]["baseline"] is True and back[1]["baseline"] is False
    assert back[2]["tokens_per_s"] is None and back[2]["status"] == "oom"
    assert back[0]["batch_size"] == 4 and back[0]["gradient_checkpointing"] is False


def test_compare_flags_moves_beyond_ten_percent():
    ref = [dict(r) for r in ROWS]
    ref[1]["tokens_per_s"] = 1500.0 / 1.15  # now 15% faster than the reference: flagged
    ref[0]["tokens_per_s"] = 1000.0 * 1.05  # 5% slower: within the threshold
    ref[4]["peak_allocated_gib"] = 20.0  # memory +50%: flagged
    ref[2]["status"] = "ok"  # a point that ran before and now runs out of memory
    del ref[3]  # a point the reference lacks
    changes, missing = compare(ROWS, ref, 0.10)
    got = {(c.scenario, c.metric) for c in changes}
    assert got == {("fast", "tokens_per_s"), ("fast", "peak_allocated_gib"), ("broken", "status")}
    tps = next(c for c in changes if c.metric == "tokens_per_s")
    assert tps.change == pytest.approx(0.15)
    assert missing == ["base @ m 4x4096"]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crash_without_result_keeps_the_last_log_line(tmp_path):
    log, result = tmp_path / "p.log", tmp_path / "p.json"
    code, timed_out = run_process(
        _python("import sys; print('loading'); print('RuntimeError: kernel exploded', file=sys.stderr); sys.exit(3)"),
        log, timeout=60,
    )  # fmt: skip
    row = outcome(code, timed_out, result, log, 60)
    assert row == {"status": "error", "error": "exit code 3: RuntimeError: kernel exploded"}


def test_killed_and_timed_out_processes(tmp_path):
    log, result = tmp_path / "p.log", tmp_path / "p.json"
    code, timed_out = run_process(
        _python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), log, 60
    )
    row = outcome(code, timed_out, result, log, 60)
    assert row["status"] == "oom" and "SIGKILL" in row["error"]
    code, timed_out = run_process(_python("import time; time.sleep(30)"), log, timeout=0.5)
    assert timed_out and outcome(code, timed_out, result, log, 0.5)["status"] == "timeout"


def test_a_result_file_wins_and_rank_files_are_read(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("")
    result = tmp_path / "p.json"
    Path(f"{result}.rank1").write_text('{"status": "oom", "error": "OutOfMemoryError: x"}')
    assert outcome(1, False, result, log, 60)["status"] == "oom"
    result.write_text('{"status": "ok", "tokens_per_s": 5.0}')
    assert outcome(0, False, result, log, 60) == {"status": "ok", "tokens_per_s": 5.0}


def test_resume_reuses_finished_points_and_reruns_timeouts(tmp_path, monkeypatch):
    import yaml

    from turbotune.bench import runner
    from turbotune.bench.scenarios import expand, load_scenarios

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"models": ["llama-tiny"], "shapes": ["2x32", "4x32"]},
                                    "scenarios": ["hf-lora"]}))  # fmt: skip
    points = expand(load_scenarios(path))
    done = {**runner.base_row(points[0]), "status": "ok", "tokens_per_s": 123.0}
    stale = {**runner.base_row(points[1]), "status": "timeout", "error": "stopped"}
    ran = []
    monkeypatch.setattr(
        runner,
        "run_point",
        lambda i, p, out, n: ran.append(p) or {**runner.base_row(p), "status": "ok"},
    )
    rows = runner.run_all(points, tmp_path / "out", show_progress=False, previous=[done, stale])
    assert rows[0] is done and ran == [points[1]] and rows[1]["status"] == "ok"
    assert [r["status"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["ok", "ok"]
