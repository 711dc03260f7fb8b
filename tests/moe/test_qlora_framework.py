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


def _grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def test_qlora_with_expert_lora_on_nf4_stacks(tmp_path, monkeypatch) -> None:
    """QLoRA + expert LoRA (``target_parameters``): the wrapped stacks are NF4 too, the adapter's
    factors are read from peft's wrappers, and the loss and every LoRA gradient equal those of
    dense stacks holding the dequantized values on peft's own parametrized path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    tiny_model("mixtral").save_pretrained(tmp_path)
    fw = turbotune.AccelerationFramework({
        "quantization": {"method": "nf4"},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"],
                    "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
        "plugins": {"fused_ops": {"moe_backend": "loop"}},
    })  # fmt: skip
    model, peft_config = fw.load_model(str(tmp_path), torch_dtype=torch.bfloat16)
    model, _ = fw.augment(model, None, peft_config)
    experts = [m for m in model.modules() if type(m).__name__ == "MixtralExperts"]
    assert all(isinstance(e.down_proj, NF4ExpertStack) for e in experts)
    with torch.no_grad():  # peft starts B at 0: give the adapters a real delta (and A grads)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    loss, grads = _grads(model, ids)
    expert_grads = [n for n in grads if "experts" in n]
    assert len(expert_grads) == 8, sorted(grads)  # 2 layers x 2 stacks x (A, B)

    for e in experts:  # peft's parametrized path on dense stacks of the dequantized values
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(e, name).dequantize()
            delattr(e, name)
            e.register_parameter(name, torch.nn.Parameter(dense, requires_grad=False))
        for wrapper in e.__dict__.pop("_turbotune_lora").values():
            wrapper.__dict__.pop("forward", None)
    dense_loss, dense_grads = _grads(model, ids)
    assert abs(loss - dense_loss) <= 1e-6, f"loss NF4 {loss} vs dense {dense_loss}"
    for name, g in dense_grads.items():
        d = (grads[name].float() - g.float()).abs()
        assert d.max() <= 1e-6, f"{name}: max abs diff {d.max():.3e} mean {d.mean():.3e}"
        assert g.abs().max() > 0, f"{name}: no gradient"
