"""QLoRA on the GPU: the bitsandbytes optimizers through `turbotune train`, and a real-shape step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_bnb_optimizers_train_qlora(optimizer, stories260k, shared_data, tmp_path):
    pytest.importorskip("datasets")
    from turbotune.train.run import run_training

    result = run_training(
        {
            "model": {"path": str(stories260k)},
            "data": {"path": str(shared_data / "alpaca" / "alpaca_tiny.json"), "max_length": 256},
            "quantization": {"method": "nf4"},
            "adapter": {"r": 8, "alpha": 16},
            "train": {
                "optimizer": optimizer, "max_steps": 12, "per_device_train_batch_size": 8,
                "learning_rate": 3e-3, "logging_steps": 1, "output_dir": str(tmp_path / optimizer),
                "report_to": [],
            },
        }
    )  # fmt: skip
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    opt = result.trainer.optimizer
    assert "bitsandbytes" in type(getattr(opt, "optimizer", opt)).__module__


@pytest.mark.gpu
def test_real_shape_qlora_layer_fused_vs_peft():
    """One Llama-3.1-8B-shaped decoder layer (hidden 4096, MLP 14336, 32/8 heads) in NF4 with LoRA
    on every projection: the fused path's output and LoRA gradients match peft's in bf16."""
    import copy

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbotune.patches import KINDS, apply_patches

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for _, module in list(model.model.layers[0].named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)  # fmt: skip
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
                setattr(module, child_name, q.cuda())
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    torch.manual_seed(1)
    ref = get_peft_model(model, lora)
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    ours = copy.deepcopy(ref)
    apply_patches(ours, KINDS)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    losses, grads = [], []
    for m in (ref, ours):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) / losses[0] < 1e-3, losses
    for name, g in grads[0].items():
        other = grads[1][name]
        rel = (g - other).norm() / g.norm().clamp_min(1e-12)
        # bf16 activations on both sides, rounded at different places: a few bf16 ulps
        # (eps 7.8e-3) of relative error in the gradient norm, never more.
        assert rel < 3e-2, f"{name}: relative gradient error {rel:.2e}"
