"""The plugin registry: discovery (built-in and entry points), order, sections, and the errors."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from turbotune.config import load_config
from turbotune.errors import ConfigError, MissingPackageError, UnsupportedModelError
from turbotune.framework import AccelerationFramework
from turbotune.plugins import ENTRY_POINT_GROUP, Plugin, Requirement, activate, discover


@dataclass
class EchoOptions:
    tag: str = "x"
    """A value the plugin records."""


class Recorder:
    calls: list[str] = []


class EarlyPlugin(Plugin):
    name = "early"
    config_cls = EchoOptions
    order = 5

    def augment(self, model, training_args, peft_config):
        Recorder.calls.append(f"early:{self.config.tag}")
        return model, training_args


class LatePlugin(Plugin):
    name = "late"
    order = 200

    def augment(self, model, training_args, peft_config):
        Recorder.calls.append("late")
        return model, training_args


class NeedsMissing(Plugin):
    name = "needy"
    requires = (Requirement("surely_not_a_real_module_xyz", "surely-not-real", extra="needy"),)


class LlamaOnly(Plugin):
    name = "llama_only"
    model_types = ("llama", "mistral")


class LoaderA(Plugin):
    name = "loader_a"
    loads_model = True


class LoaderB(Plugin):
    name = "loader_b"
    loads_model = True


def registry(*classes):
    return {c.name: c for c in classes}


def test_builtins_are_discovered():
    found = discover()
    assert "adapter" in found and issubclass(found["adapter"], Plugin)


def test_active_plugins_ordered_and_receive_only_their_section():
    cfg = load_config({"plugins": {"late": {}, "early": {"tag": "t1"}}})
    active = activate(cfg, registry(LatePlugin, EarlyPlugin, LlamaOnly))
    assert [p.name for p in active] == ["early", "late"]  # by order, not by config order
    assert active[0].config == EchoOptions(tag="t1")
    Recorder.calls = []
    for p in active:
        p.augment(None, None, None)
    assert Recorder.calls == ["early:t1", "late"]


def test_plugin_section_is_checked_with_plugin_name_in_key():
    cfg = load_config({"plugins": {"early": {"tga": 1}}})
    with pytest.raises(ConfigError, match=r"unknown key 'plugins.early.tga'. Did you mean 'tag'"):
        activate(cfg, registry(EarlyPlugin))


def test_enabled_false_deactivates():
    cfg = load_config({"plugins": {"early": {"enabled": False}}})
    assert activate(cfg, registry(EarlyPlugin)) == []


def test_unknown_plugin_lists_known_ones():
    cfg = load_config({"plugins": {"erly": {}}})
    with pytest.raises(
        ConfigError, match=r"'plugins.erly' names no known plugin; known: early, late"
    ):
        activate(cfg, registry(EarlyPlugin, LatePlugin))


def test_missing_package_gives_exact_pip_command():
    cfg = load_config({"plugins": {"needy": {}}})
    with pytest.raises(MissingPackageError) as err:
        activate(cfg, registry(NeedsMissing))
    assert "pip install 'turbotune[needy]'" in str(err.value)
    assert "surely_not_a_real_module_xyz" in str(err.value)


def test_unsupported_model_names_supported_types():
    from transformers import GPT2Config

    plugin = LlamaOnly(None)
    model = torch.nn.Module()
    model.config = GPT2Config()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama, mistral"):
        plugin.check_model(model)


def test_two_loaders_is_an_error():
    cfg = load_config({"plugins": {"loader_a": {}, "loader_b": {}}})
    with pytest.raises(ConfigError, match="only one plugin may load the model"):
        activate(cfg, registry(LoaderA, LoaderB))


def test_entry_point_discovery(tmp_path, monkeypatch):
    """A third-party plugin registered through a real (temporary) distribution's entry point."""
    pkg = tmp_path / "tt_thirdparty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from turbotune.plugins import Plugin

            class ThirdParty(Plugin):
                name = "third_party"
                description = "from an entry point"
                order = 150
            """
        )
    )
    dist = tmp_path / "tt_thirdparty-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tt-thirdparty\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nthird_party = tt_thirdparty:ThirdParty\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover()
    assert "third_party" in found and found["third_party"].description == "from an entry point"
    fw = AccelerationFramework(
        {"plugins": {"third_party": {}}, "adapter": {"method": "full"}}, banner=False
    )
    assert [p.name for p in fw.plugins] == ["adapter", "third_party"]
    sys.modules.pop("tt_thirdparty", None)


def test_banner_names_plugins_and_versions():
    fw = AccelerationFramework({"adapter": {"r": 4}}, banner=False)
    text = "\n".join(fw.banner_lines())
    assert "adapter" in text and "lora r=4" in text and "turbotune 0.1.0" in text


def test_framework_reads_env_var(tmp_path, monkeypatch):
    path = tmp_path / "accel.yaml"
    path.write_text("adapter: {r: 2}\n")
    monkeypatch.setenv("TURBOTUNE_CONFIG", str(path))
    fw = AccelerationFramework(banner=False)
    assert fw.peft_config().r == 2
    monkeypatch.delenv("TURBOTUNE_CONFIG")
    with pytest.raises(Exception, match="TURBOTUNE_CONFIG"):
        AccelerationFramework(banner=False)
