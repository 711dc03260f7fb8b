"""projection_of reads peft's LoRA state from the instance dicts (a speed-up): every state in
which the fused op would compute something else than peft must still fall back (None)."""

from __future__ import annotations

import pytest
import torch

from turbotune.patches.forwards import projection_of


def _config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(target_modules=["0"], **{"r": 4, "lora_alpha": 8, **kwargs})


def _layer(**kwargs):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    peft_model = get_peft_model(model, _config(lora_dropout=0.25, **kwargs))
    peft_model.train()
    return peft_model.base_model.model[0]


def test_reads_the_active_adapter():
    layer = _layer()
    proj = projection_of(layer)
    assert proj.base is layer.base_layer and proj.bias is layer.base_layer.bias
    assert proj.lora.A is layer.lora_A["default"].weight
    assert proj.lora.B is layer.lora_B["default"].weight
    assert (proj.lora.scaling, proj.lora.dropout) == (2.0, 0.25)
    layer.eval()
    assert projection_of(layer).lora.dropout == 0.0  # dropout is off in eval mode
    layer.scaling["default"] = 0.5  # peft's set_scale writes here
    assert projection_of(layer).lora.scaling == 0.5


def test_switching_adapters():
    layer = _layer()
    layer.update_layer("other", config=_config(r=2, lora_alpha=2), r=2, lora_alpha=2)
    layer.set_adapter("other")
    proj = projection_of(layer)
    assert proj.lora.A is layer.lora_A["other"].weight and proj.lora.scaling == 1.0
    layer.set_adapter(["default", "other"])  # two active adapters: peft sums them
    assert projection_of(layer) is None
    layer.set_adapter(["default", "missing"])  # only the present one counts, as in peft
    assert projection_of(layer).lora.A is layer.lora_A["default"].weight


@pytest.mark.parametrize("state", ["merged", "disabled", "trainable_base", "dora"])
def test_falls_back(state):
    layer = _layer(use_dora=state == "dora")
    if state == "merged":
        layer.merge()
    elif state == "disabled":
        layer.enable_adapters(False)
    elif state == "trainable_base":
        layer.base_layer.weight.requires_grad_(True)
    assert projection_of(layer) is None
    if state == "merged":
        layer.unmerge()
        assert projection_of(layer) is not None
    elif state == "disabled":
        layer.enable_adapters(True)
        assert projection_of(layer) is not None


def test_plain_linear_and_other_modules():
    frozen = torch.nn.Linear(6, 4).requires_grad_(False)
    proj = projection_of(frozen)
    assert proj.base is frozen and proj.lora is None and proj.bias is frozen.bias
    assert projection_of(torch.nn.Linear(6, 4)) is None  # trainable: keeps its own forward
    assert projection_of(torch.nn.Conv1d(3, 3, 1).requires_grad_(False)) is None
