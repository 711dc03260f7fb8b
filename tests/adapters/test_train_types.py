"""Every fsdp_qlora train type is accepted and maps onto the adapter and quantization sections."""

from __future__ import annotations

import pytest

from turbotune.config import TRAIN_TYPES, load_config
from turbotune.errors import ConfigError

EXPECTED = {
    # name: (adapter.method, adapter.implementation, quantization.method)
    "full": ("full", "peft", "none"),
    "lora": ("lora", "peft", "none"),
    "custom_lora": ("lora", "custom", "none"),
    "qlora": ("lora", "peft", "nf4"),
    "custom_qlora": ("lora", "custom", "nf4"),
    "hqq_lora": ("lora", "custom", "hqq"),
    "bnb_dora": ("dora", "peft", "nf4"),
    "hqq_dora": ("dora", "custom", "hqq"),  # peft's DoRA cannot wrap turbotune's HQQLinear
    "bnb_llama_pro": ("llama_pro", "peft", "nf4"),
    "hqq_llama_pro": ("llama_pro", "custom", "hqq"),  # the hqq plugin wants custom layers
}


def test_every_reference_train_type_is_covered():
    assert set(EXPECTED) == set(TRAIN_TYPES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_train_type_maps_onto_the_sections(name):
    cfg = load_config({"train_type": name})
    got = (cfg.adapter.method, cfg.adapter.implementation, cfg.quantization.method)
    assert got == EXPECTED[name]


def test_bnb_dora_can_take_the_custom_layer_and_conflicts_are_errors():
    cfg = load_config({"train_type": "bnb_dora", "adapter": {"implementation": "custom"}})
    assert (cfg.adapter.method, cfg.adapter.implementation) == ("dora", "custom")
    with pytest.raises(ConfigError, match=r"sets adapter\.method='llama_pro'"):
        load_config({"train_type": "bnb_llama_pro", "adapter": {"method": "lora"}})


@pytest.mark.parametrize("name", ["hqq_lora", "hqq_dora", "hqq_llama_pro"])
def test_hqq_train_types_activate_the_hqq_plugin(name):
    from turbotune.plugins import activate

    active = [p.name for p in activate(load_config({"train_type": name}))]
    assert "hqq" in active and "bnb" not in active, active
