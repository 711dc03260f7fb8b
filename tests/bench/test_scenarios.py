"""Scenario files: validation, expansion into points, run order, --only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from turbotune.bench.scenarios import Shape, expand, load_scenarios, parse_shape
from turbotune.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cross_product_and_order(tmp_path):
    path = _write(tmp_path, {
        "baseline": "hf-lora",
        "defaults": {"models": ["llama-tiny", "mixtral-tiny@layers=1"], "batch_sizes": [1, 2],
                     "seq_lens": [16, 32], "gradient_checkpointing": [False, True], "gpus": 1},
        "scenarios": [
            {"name": "mine", "config": {"adapter": {"method": "lora"}}},
            "hf-qlora",
            {"name": "hf-lora"},
        ],
    })  # fmt: skip
    scenarios = load_scenarios(path)
    # the marked baseline first, then the other built-ins, then turbotune configs
    assert [s.name for s in scenarios] == ["hf-lora", "hf-qlora", "mine"]
    assert [s.is_baseline for s in scenarios] == [True, False, False]
    points = expand(scenarios)
    assert len(points) == 3 * 2 * 2 * 2 * 2
    per = [p for p in points if p.scenario == "mine"]
    keys = {p.key for p in per}
    assert len(keys) == 16
    assert ("mixtral-tiny@layers=1", 2, 32, True, 1) in keys
    # every scenario covers the same points, so each has a baseline to compare with
    assert {p.key for p in points if p.is_baseline} == keys
    assert points[0].builtin == "hf-lora" and points[-1].builtin is None


def test_shapes_and_scenario_overrides(tmp_path):
    path = _write(tmp_path, {
        "defaults": {"models": "llama-tiny", "shapes": ["4x1024", "8x1024+gc",
                     {"batch_size": 2, "seq_len": 64, "gradient_checkpointing": True}], "steps": 7},
        "scenarios": ["hf-qlora", {"name": "short", "config": {}, "steps": 2, "gpus": [1, 2]}],
    })  # fmt: skip
    points = expand(load_scenarios(path, warmup=1))
    base = [p for p in points if p.scenario == "hf-qlora"]
    assert [(p.batch_size, p.seq_len, p.gradient_checkpointing) for p in base] == [
        (4, 1024, False), (8, 1024, True), (2, 64, True)]  # fmt: skip
    assert all(p.settings.steps == 7 and p.settings.warmup == 1 for p in base)
    short = [p for p in points if p.scenario == "short"]
    assert len(short) == 6 and all(p.settings.steps == 2 for p in short)
    assert sorted({p.gpus for p in short}) == [1, 2]
    # --steps wins over the file
    assert all(p.settings.steps == 3 for p in expand(load_scenarios(path, steps=3)))


def test_only_keeps_the_baseline(tmp_path):
    path = _write(tmp_path, {"defaults": {"models": ["llama-tiny"]},
                             "scenarios": ["hf-lora", "hf-full", {"name": "t", "config": {}}]})  # fmt: skip
    names = {p.scenario for p in expand(load_scenarios(path), only=["t"])}
    assert names == {"hf-lora", "t"}
    with pytest.raises(ConfigError, match="unknown scenarios"):
        expand(load_scenarios(path), only=["nope"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scenarios": ["hf-nothing"]}, "not a built-in baseline"),
        ({"scenarios": [{"name": "x", "builtin": "hf-zzz"}]}, "builtin"),
        ({"scenarios": ["hf-lora", "hf-lora"]}, "unique"),
        ({"scenarios": ["hf-lora"], "baseline": "other"}, "baseline 'other'"),
        ({"defaults": {"stepz": 3}, "scenarios": ["hf-lora"]}, "Did you mean 'steps'"),
        ({"defaults": {"shapes": ["4by1024"]}, "scenarios": ["hf-lora"]}, "BATCHxSEQ"),
        ({"defaults": {"models": ["gpt-17"]}, "scenarios": ["hf-lora"]}, "neither a known name"),
        ({"scenarios": [{"name": "c", "config": "missing.yaml"}]}, "not found"),
        ({"scenarios": []}, "empty"),
    ],
)
def test_invalid_files(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=message):
        expand(load_scenarios(path))


def test_parse_shape():
    assert parse_shape("8x1024+gc", "s") == Shape(8, 1024, True)
    assert parse_shape(" 4 x 512 ", "s") == Shape(4, 512, False)


def test_config_from_a_file_relative_to_the_scenarios(tmp_path):
    (tmp_path / "q.yaml").write_text("quantization: {method: nf4}\n")
    path = _write(tmp_path, {"scenarios": ["hf-qlora", {"name": "q", "config": "q.yaml"}]})
    q = next(s for s in load_scenarios(path) if s.name == "q")
    assert q.config == {"quantization": {"method": "nf4"}}


def test_shipped_scenario_files_load():
    ref = load_scenarios(REPO / "benchmarks" / "reference-workload.yaml")
    points = expand(ref)
    assert [s.name for s in ref] == [
        "hf-qlora-amp", "hf-qlora", "hf-qlora-kbit", "turbotune-qlora", "turbotune-qlora-fused",
        "turbotune-qlora-fused-offload", "turbotune-qlora-fused-offload12"]  # fmt: skip
    assert ref[0].is_baseline and ref[0].settings.precision == "bf16_buffers_autocast"
    assert {(p.model, p.batch_size, p.seq_len, p.gradient_checkpointing) for p in points} == {
        ("llama-3.1-8b", 4, 1024, False), ("llama-3.1-8b", 8, 1024, True)}  # fmt: skip
    fused = next(s for s in ref if s.name == "turbotune-qlora-fused")
    assert fused.config["plugins"] == {"fused_ops": {}}
    shipped = sorted((REPO / "benchmarks").glob("*.yaml"))
    assert len(shipped) >= 10, shipped
    for path in shipped:  # every scenario file in the repository loads and has points
        assert expand(load_scenarios(path)), path.name
