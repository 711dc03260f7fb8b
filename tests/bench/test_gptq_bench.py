"""The benchmark's GPTQ setup: random-weight models packed into GPTQLinear as they are built."""

from __future__ import annotations

import pytest
import torch

from turbotune.bench.build import GPTQBenchSpec, build_random_model
from turbotune.bench.data import random_batches
from turbotune.bench.loop import MemoryMeter, timed_loop
from turbotune.bench.models import resolve_model_config
from turbotune.bench.setups import (
    DEFAULT_LORA,
    PointSettings,
    prepare_turbotune,
    turbotune_config_dict,
)
from turbotune.quant.gptq import GPTQSpec, rtn_quantize
from turbotune.quant.gptq_linear import GPTQLinear

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _eager_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager references: the interpreter is slow


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_build_packs_the_same_random_weights(desc_act):
    """Each GPTQ layer dequantizes to RTN of the dense build's weight (act-order: g_idx
    permuted, so only the layout is checked)."""
    config = resolve_model_config("llama-tiny")
    spec = GPTQBenchSpec(bits=4, group_size=32, desc_act=desc_act, compute_dtype=torch.float32)
    dense = build_random_model(config, device=CPU, dtype=torch.float32, seed=3)
    gptq = build_random_model(config, device=CPU, dtype=torch.float32, quant=spec, seed=3)
    layer = gptq.model.layers[1].mlp.down_proj
    assert isinstance(layer, GPTQLinear) and type(gptq.lm_head) is torch.nn.Linear
    assert not getattr(gptq, "is_loaded_in_4bit", False)  # peft must not take it for bnb
    weight = dense.model.layers[1].mlp.down_proj.weight
    if desc_act:
        assert not torch.equal(layer.g_idx, torch.sort(layer.g_idx).values)
        assert torch.equal(torch.bincount(layer.g_idx), torch.full((weight.shape[1] // 32,), 32))
    else:
        _, want = rtn_quantize(weight, GPTQSpec(bits=4, group_size=32))
        got = layer.dequantize(torch.float32)
        d = (got - want).abs()
        assert torch.equal(got, want), f"max abs diff {d.max():.3g}, mean {d.mean():.3g}"
    assert torch.equal(gptq.model.embed_tokens.weight, dense.model.embed_tokens.weight)


@pytest.mark.parametrize("fused", [False, True])
def test_turbotune_gptq_lora_setup_trains(tmp_path, fused):
    config = resolve_model_config("llama-tiny")
    s = PointSettings(
        gradient_checkpointing=False, precision="fp32", learning_rate=1e-2, lora=DEFAULT_LORA,
        attn_implementation="sdpa", seed=5, batch_size=2, output_dir=str(tmp_path),
    )  # fmt: skip
    quant = {"method": "gptq", "bits": 4, "group_size": 32, "compute_dtype": "float32"}
    raw = turbotune_config_dict(
        {"quantization": quant, "plugins": {"fused_ops": {}} if fused else {}}, s
    )
    prepared = prepare_turbotune(raw, config, s, CPU)
    q = prepared.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, GPTQLinear) and "default" in q.lora_A
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * config.num_hidden_layers
    # one batch repeated: LoRA on the GPTQ base must fit it
    batches = random_batches(config.vocab_size, 2, 16, 1, seed=1, device=CPU) * 8
    res = timed_loop(prepared.model, batches, warmup=1, steps=7, learning_rate=1e-2,
                     autocast=prepared.autocast, device=CPU, meter=MemoryMeter(CPU))  # fmt: skip
    assert res.losses[-1] < res.losses[0] - 0.1, res.losses
