"""The bench's DoRA points (benchmarks/dora.yaml): the peft QDoRA baseline and turbotune's
``bnb_dora`` (peft and custom layers) train identically on the bench's random tiny Llama."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")

pytest.importorskip("bitsandbytes")

CPU = torch.device("cpu")


def test_bnb_dora_points_match_the_peft_qdora_baseline(tmp_path):
    from turbotune.bench.data import random_batches
    from turbotune.bench.loop import MemoryMeter, timed_loop
    from turbotune.bench.models import resolve_model_config
    from turbotune.bench.setups import (
        DEFAULT_LORA,
        PointSettings,
        prepare_baseline,
        prepare_turbotune,
        turbotune_config_dict,
    )

    config = resolve_model_config("llama-tiny")
    s = PointSettings(gradient_checkpointing=False, precision="bf16", learning_rate=1e-3,
                      lora=DEFAULT_LORA, attn_implementation="sdpa", seed=5, batch_size=2,
                      output_dir=str(tmp_path))  # fmt: skip

    def losses(prepared) -> list[float]:
        batches = random_batches(config.vocab_size, 2, 16, 4, seed=1, device=CPU)
        res = timed_loop(prepared.model, batches, warmup=1, steps=3, learning_rate=1e-3,
                         autocast=prepared.autocast, device=CPU, meter=MemoryMeter(CPU))  # fmt: skip
        return res.losses

    baseline = prepare_baseline("hf-qdora", config, s, CPU)
    magnitudes = [n for n, p in baseline.model.named_parameters() if "magnitude" in n]
    assert len(magnitudes) == 7 * config.num_hidden_layers
    base = losses(baseline)
    for implementation in ("peft", "custom"):
        raw = turbotune_config_dict(
            {"train_type": "bnb_dora", "adapter": {"implementation": implementation}}, s
        )
        ours = losses(prepare_turbotune(raw, config, s, CPU))
        diff = max(abs(a - b) for a, b in zip(base, ours))
        assert diff < 1e-6, f"{implementation}: max abs diff {diff:.2e}\nbase {base}\nours {ours}"
