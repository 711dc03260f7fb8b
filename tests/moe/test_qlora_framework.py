"""QLoRA on a MoE model through the framework (bnb plugin, peft LoRA, fused_ops): the frozen
expert stacks end up in NF4 and patched, the loss carries the router's auxiliary loss, and it
equals the loss of the same model with the stacks replaced by their dense dequantized values."""

from __future__ import annotations

import pytest
import torch
from tests.moe.tiny import tiny_model

import turbotune
from turbotune.moe.quant import NF4ExpertStack

pytest.importorskip("bitsandbytes")


def test_qlora_mixtral_quantizes_and_patches_experts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager kernels: wiring is under test here
    torch.set_num_threads(1)
    tiny_model("mixtral").save_pretrained(tmp_path)
    fw = turbotune.AccelerationFramework({
        "quantization": {"method": "nf4"},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "plugins": {"fused_ops": {"moe_backend": "loop"}},
    })  # fmt: skip
    model, peft_config = fw.load_model(str(tmp_path), torch_dtype=torch.bfloat16)
    model, _ = fw.augment(model, None, peft_config)
    experts = [m for m in model.modules() if type(m).__name__ == "MixtralExperts"]
    assert len(experts) == 2
    assert all(isinstance(e.gate_up_proj, NF4ExpertStack) for e in experts)
    assert model.__dict__["_turbotune_patches"].counts["moe"] == 2

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert out.aux_loss is not None and out.aux_loss > 0
    lora = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A: 0 while B = 0
    assert lora and all(g is not None and g.abs().max() > 0 for g in lora)

    for e in experts:  # dense stacks holding exactly the dequantized values
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(e, name).dequantize()
            delattr(e, name)
            e.register_parameter(name, torch.nn.Parameter(dense, requires_grad=False))
    with torch.no_grad():
        dense_out = model(input_ids=ids, labels=ids, output_router_logits=True)
    diff = (out.loss.detach() - dense_out.loss).abs().item()
    assert diff <= 1e-6, f"loss NF4 {out.loss.item()} vs dense dequantized {dense_out.loss.item()}"
