"""The benchmark's HQQ setup: random-weight models quantized with HQQ as they are built."""

from __future__ import annotations

import pytest
import torch

from turbotune.bench.build import HQQSpec, build_random_model
from turbotune.bench.data import random_batches
from turbotune.bench.loop import MemoryMeter, timed_loop
from turbotune.bench.models import resolve_model_config
from turbotune.bench.setups import (
    DEFAULT_LORA,
    PointSettings,
    prepare_turbotune,
    turbotune_config_dict,
)
from turbotune.quant.hqq import quantize
from turbotune.quant.hqq_linear import HQQLinear

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _eager_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager references: the interpreter is slow


def test_hqq_build_quantizes_the_same_random_weights():
    """Each HQQ layer holds exactly the quantization of the dense build's weight."""
    config = resolve_model_config("llama-tiny")
    spec = HQQSpec(bits=4, group_size=32, compute_dtype=torch.float32)
    dense = build_random_model(config, device=CPU, dtype=torch.float32, seed=3)
    hqq = build_random_model(config, device=CPU, dtype=torch.float32, quant=spec, seed=3)
    layer = hqq.model.layers[1].mlp.down_proj
    assert isinstance(layer, HQQLinear) and type(hqq.lm_head) is torch.nn.Linear
    assert not getattr(hqq, "is_loaded_in_4bit", False)  # peft must not take it for bnb
    want = quantize(dense.model.layers[1].mlp.down_proj.weight, 4, 32)
    assert torch.equal(layer.W_q, want.packed) and torch.equal(layer.zero, want.zero)
    assert torch.equal(hqq.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_turbotune_hqq_lora_setup_trains(tmp_path):
    config = resolve_model_config("llama-tiny")
    s = PointSettings(
        gradient_checkpointing=False, precision="fp32", learning_rate=1e-2, lora=DEFAULT_LORA,
        attn_implementation="sdpa", seed=5, batch_size=2, output_dir=str(tmp_path),
    )  # fmt: skip
    raw = turbotune_config_dict(
        {"train_type": "hqq_lora", "quantization": {"compute_dtype": "float32"},
         "plugins": {"fused_ops": {}}}, s,
    )  # fmt: skip
    prepared = prepare_turbotune(raw, config, s, CPU)
    q = prepared.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, HQQLinear) and "default" in q.lora_A
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * config.num_hidden_layers
    # one batch repeated: LoRA on the HQQ base must fit it
    batches = random_batches(config.vocab_size, 2, 16, 1, seed=1, device=CPU) * 8
    res = timed_loop(prepared.model, batches, warmup=1, steps=7, learning_rate=1e-2,
                     autocast=prepared.autocast, device=CPU, meter=MemoryMeter(CPU))  # fmt: skip
    assert res.losses[-1] < res.losses[0] - 0.1, res.losses
