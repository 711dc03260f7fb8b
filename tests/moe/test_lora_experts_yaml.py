"""Expert LoRA from a YAML config (``adapter.target_parameters``): a tiny Mixtral trains through
the framework with one LoRA pair per expert (grouped rank-r products, patched experts), the
adapter saves in PEFT format, and peft reloads it onto the plain transformers model with the same
logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tests.helpers import train_steps
from tests.moe.tiny import tiny_model
from transformers import AutoModelForCausalLM

import turbotune

_YAML = """
adapter:
  method: lora
  r: 4
  alpha: 8
  target_modules: [q_proj, v_proj]
  target_parameters: [experts.gate_up_proj, experts.down_proj]
plugins:
  fused_ops:
    moe_backend: loop
"""


def test_yaml_expert_lora_trains_saves_and_reloads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager kernels: the wiring is under test here
    torch.set_num_threads(1)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("mixtral").save_pretrained(base_dir)
    (tmp_path / "run.yaml").write_text(_YAML)
    fw = turbotune.AccelerationFramework(str(tmp_path / "run.yaml"))
    model, peft_config = fw.load_model(str(base_dir), dtype=torch.float32)
    assert list(peft_config.target_parameters) == [
        "experts.gate_up_proj", "experts.down_proj"
    ]  # fmt: skip
    model, _ = fw.augment(model, None, peft_config)
    assert model.__dict__["_turbotune_patches"].counts["moe"] == 2  # patched experts train
    expert_lora = {n: p.detach().clone() for n, p in model.named_parameters()
                   if "experts" in n and "lora_" in n}  # fmt: skip
    assert len(expert_lora) == 2 * 2 * 2, sorted(expert_lora)  # layers x stacks x (A, B)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 9), generator=gen) for _ in range(4)]
    losses = train_steps(model, batches * 2, lr=1e-2, train_mode=True)
    assert losses[-1] < losses[0], losses
    trained = dict(model.named_parameters())
    for name, before in expert_lora.items():  # the expert adapters took part in training
        assert not torch.equal(trained[name].detach(), before), f"{name} did not change"

    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    ids = batches[0]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
    )
    reloaded.base_model.model.set_experts_implementation("eager")
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    diff = (got - want).abs()
    assert diff.max() <= 1e-4, f"logits: max abs diff {diff.max():.3e} mean {diff.mean():.3e}"
    assert (plain - want).abs().max() > 1e-3, "the adapter changed nothing: the test proves nothing"


def test_target_parameters_need_peft() -> None:
    from turbotune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"target_parameters needs adapter\.implementation=peft"):
        turbotune.AccelerationFramework({
            "adapter": {"implementation": "custom", "target_parameters": ["experts.down_proj"]}
        }).peft_config()  # fmt: skip
