"""In-process checks of the baselines, the turbotune path and the timed loop (tiny llama, CPU)."""

from __future__ import annotations

import pytest
import torch

from turbotune.bench.data import Batch, random_batches
from turbotune.bench.loop import MemoryMeter, timed_loop
from turbotune.bench.models import resolve_model_config
from turbotune.bench.setups import (
    DEFAULT_LORA,
    PointSettings,
    prepare_baseline,
    prepare_turbotune,
    turbotune_config_dict,
)

CPU = torch.device("cpu")


def _settings(tmp_path, **kw) -> PointSettings:
    base = dict(gradient_checkpointing=False, precision="fp32", learning_rate=2e-4,
                lora=DEFAULT_LORA, attn_implementation="sdpa", seed=5, batch_size=2,
                output_dir=str(tmp_path))  # fmt: skip
    return PointSettings(**{**base, **kw})


def _losses(prepared, n=4, lr=2e-4) -> list[float]:
    config = prepared.model.config
    batches = random_batches(config.vocab_size, 2, 16, n, seed=1, device=CPU)
    res = timed_loop(prepared.model, batches, warmup=1, steps=n - 1, learning_rate=lr,
                     autocast=prepared.autocast, device=CPU, meter=MemoryMeter(CPU))  # fmt: skip
    return res.losses


def test_qlora_baselines_differ_only_by_kbit_upcasts(tmp_path):
    import bitsandbytes as bnb

    config = resolve_model_config("llama-tiny")
    s = _settings(tmp_path, precision="bf16")
    plain = prepare_baseline("hf-qlora", config, s, CPU).model
    kbit = prepare_baseline("hf-qlora-kbit", config, s, CPU).model
    norm = "base_model.model.model.layers.0.input_layernorm.weight"
    assert dict(plain.named_parameters())[norm].dtype == torch.bfloat16
    assert dict(kbit.named_parameters())[norm].dtype == torch.float32
    q = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and "default" in q.lora_A
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * config.num_hidden_layers


def test_turbotune_config_matches_the_baseline_step_for_step(tmp_path):
    """Same random weights, same data, same loop: a turbotune config without patches must
    reproduce the baseline's losses (QLoRA through the bench's 4-bit builder on both sides)."""
    config = resolve_model_config("llama-tiny")
    s = _settings(tmp_path, precision="bf16")
    base = _losses(prepare_baseline("hf-qlora", config, s, CPU))
    raw = turbotune_config_dict({"quantization": {"method": "nf4"}}, s)
    assert raw["adapter"]["target_modules"] == DEFAULT_LORA["target_modules"]
    assert raw["train"]["per_device_train_batch_size"] == 2
    ours = _losses(prepare_turbotune(raw, config, s, CPU))
    diff = max(abs(a - b) for a, b in zip(base, ours))
    assert diff < 1e-6, f"losses differ: max abs diff {diff:.2e}\nbase {base}\nours {ours}"


def test_full_finetuning_trains_everything_and_the_loop_learns(tmp_path):
    config = resolve_model_config("llama-tiny")
    prepared = prepare_baseline("hf-full", config, _settings(tmp_path), CPU)
    model = prepared.model
    assert prepared.trainable == "full" and all(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    same = [Batch({"input_ids": ids, "labels": ids}, 32, [16, 16]) for _ in range(8)]
    res = timed_loop(model, same, warmup=2, steps=6, learning_rate=1e-2, autocast=None,
                     device=CPU, meter=MemoryMeter(CPU))  # fmt: skip
    assert len(res.step_times) == 6 and len(res.losses) == 8 and res.step_tokens == [32] * 6
    assert res.losses[-1] < res.losses[0] - 1.0, res.losses  # AdamW steps were taken
    assert res.tokens_per_s > 0 and res.peak_allocated > 0


def test_checkpointing_does_not_change_the_losses(tmp_path):
    config = resolve_model_config("llama-tiny")
    off = _losses(prepare_baseline("hf-lora", config, _settings(tmp_path), CPU), lr=1e-2)
    on_prep = prepare_baseline(
        "hf-lora", config, _settings(tmp_path, gradient_checkpointing=True), CPU
    )
    assert on_prep.model.base_model.model.model.gradient_checkpointing
    on = _losses(on_prep, lr=1e-2)
    assert on == pytest.approx(off, abs=1e-5), (off, on)
