"""A user's own Hugging Face Trainer script, accelerated through AccelerationFramework."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@pytest.fixture
def tiny_llama_dir(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_trainer_through_framework(tmp_path, tiny_llama_dir):
    import turbotune

    fw = turbotune.AccelerationFramework(
        {"adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        banner=False,
    )
    model, peft_config = fw.load_model(str(tiny_llama_dir), torch_dtype=torch.float32)
    assert peft_config.r == 4
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    assert model.config.use_cache
    model, args = fw.augment(model, args, peft_config)
    assert not model.config.use_cache  # training forwards build no KV cache
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=g)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=fw.callbacks(model))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert changed, "LoRA B weights did not move"
