"""Config loading, overrides and every config error (the message must name key, file, choices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from turbotune.config import Config, load_config
from turbotune.configtools import apply_overrides, build, field_docs, parse_override
from turbotune.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_types(tmp_path):
    path = write(
        tmp_path,
        "model: {path: /m}\nadapter: {r: 8, target_modules: [q_proj, v_proj]}\n"
        "train: {learning_rate: 1e-4, max_steps: 5, warmup_ratio: 0.1, logging_first_step: true}\n",
    )
    cfg = load_config(path)
    assert cfg.model.path == "/m"
    assert cfg.adapter.r == 8 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string
    assert cfg.train.hf_args == {"logging_first_step": True}  # TrainingArguments pass-through
    assert cfg.source == str(path)


def test_overrides_win_and_create_sections(tmp_path):
    path = write(tmp_path, "train: {max_steps: 5}\n")
    cfg = load_config(path, ["train.max_steps=7", "adapter.dropout=0.05", "data.path=x.json"])
    assert cfg.train.max_steps == 7
    assert cfg.adapter.dropout == pytest.approx(0.05)
    assert cfg.data.path == "x.json"
    assert "command-line overrides" in cfg.source


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a.b=true") == (["a", "b"], True)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("nokey")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.max_steps=1"])


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("trian: {}\n", ["unknown key 'trian'", "Did you mean 'train'", "Valid keys", "run.yaml"]),
        (
            "train: {learnin_rate: 1}\n",
            ["'train.learnin_rate'", "learning_rate", "TrainingArguments"],
        ),
        ("adapter: {method: lorra}\n", ["'adapter.method'", "'lora'", "Valid values"]),
        ("adapter: {r: many}\n", ["'adapter.r' must be int", "'many'"]),
        ("train: {gradient_checkpointing: 1}\n", ["'train.gradient_checkpointing' must be bool"]),
        ("train: {report_to: stdout}\n", ["'train.report_to' must be a list of str"]),
        ("model: 3\n", ["'model' must be a mapping"]),
        ("train: {logging_first_step: maybe}\n", ["'train.logging_first_step' must be bool"]),
        ("data: {eval_ratio: 1.5}\n", ["data.eval_ratio", "[0, 1)"]),
        ("train: {warmup_steps: 3, warmup_ratio: 0.1}\n", ["at most one of"]),
        ("train_type: qlorra\n", ["'train_type'", "qlora"]),
        (
            "train_type: qlora\nquantization: {method: gptq}\n",
            ["train_type 'qlora' sets quantization.method"],
        ),
        ("- a\n- b\n", ["top level must be a mapping"]),
        ("a: [\n", ["not valid YAML"]),
    ],
)
def test_config_errors_name_key_file_and_choices(tmp_path, text, patterns):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for pattern in patterns:
        assert pattern in str(err.value), f"{pattern!r} not in: {err.value}"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_train_type_maps_onto_sections():
    cfg = load_config({"train_type": "custom_qlora"})
    assert (cfg.adapter.method, cfg.adapter.implementation, cfg.quantization.method) == (
        "lora",
        "custom",
        "nf4",
    )
    assert load_config({"train_type": "full"}).adapter.method == "full"


def test_to_dict_round_trip():
    cfg = load_config({"train": {"max_steps": 3, "logging_first_step": True}, "plugins": {"x": {}}})
    again = load_config(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.train.hf_args == {"logging_first_step": True}


def test_build_generic_dataclass_and_docs():
    @dataclass
    class Section:
        mode: Literal["a", "b"] = "a"
        """The mode."""
        size: int | None = None
        """How many."""

    assert build(Section, {"size": 3}, where="plugins.x", source="f.yaml").size == 3
    with pytest.raises(
        ConfigError, match=r"f.yaml: unknown key 'plugins.x.sise'. Did you mean 'size'"
    ):
        build(Section, {"sise": 3}, where="plugins.x", source="f.yaml")
    docs = field_docs(Config)
    assert "fsdp_qlora" in docs["train_type"]
    from turbotune.config import TrainConfig

    train_docs = field_docs(TrainConfig)
    assert all(train_docs.get(name) for name in ("learning_rate", "precision", "lr_scheduler"))
