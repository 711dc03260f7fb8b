"""The sample configurations: each loads, activates exactly the plugins the catalog names, and
every key `turbotune arguments` shows exists."""

from __future__ import annotations

import pytest

from turbotune.cli import configs_dir, load_catalog
from turbotune.config import load_config
from turbotune.plugins import activate

CATALOG = load_catalog()


def test_every_yaml_is_in_the_catalog():
    files = {p.name for p in configs_dir().glob("*.yaml")} - {"catalog.yaml"}
    assert files == {entry["file"] for entry in CATALOG.values()}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_sample_config_loads_with_its_plugins(name):
    entry = CATALOG[name]
    cfg = load_config(configs_dir() / entry["file"])
    active = {p.name for p in activate(cfg)}
    assert active == set(entry["plugins"]), (
        f"{name}: catalog says {entry['plugins']}, config activates {sorted(active)}"
    )
    for key in entry["arguments"]:
        section, _, field = key.partition(".")
        assert hasattr(getattr(cfg, section), field), f"{name}: argument {key} is not a config key"
