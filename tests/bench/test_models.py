"""The model table and the random-weight builder (meta device, per-layer 4-bit packing)."""

from __future__ import annotations

import json

import pytest
import torch

from turbotune.bench.build import QuantSpec, build_random_model
from turbotune.bench.models import (
    MODEL_TABLE,
    model_config_dict,
    parse_model_spec,
    resolve_model_config,
)
from turbotune.errors import ConfigError
from turbotune.train.flops import linear_params

CPU = torch.device("cpu")


def test_spec_parsing():
    spec = parse_model_spec("mixtral-8x7b@layers=4,num_local_experts=2,rope_theta=1e4")
    assert spec.source == "mixtral-8x7b"
    assert spec.overrides == {"num_hidden_layers": 4, "num_local_experts": 2, "rope_theta": 1e4}
    assert parse_model_spec("llama-tiny").overrides == {}
    with pytest.raises(ConfigError, match="key=value"):
        parse_model_spec("llama-tiny@layers")
    with pytest.raises(ConfigError, match="neither a known name"):
        parse_model_spec("no-such-model")


@pytest.mark.parametrize("name", sorted(MODEL_TABLE))
def test_every_table_entry_builds_a_transformers_config(name):
    config = resolve_model_config(name)
    assert config.model_type == MODEL_TABLE[name]["model_type"]
    assert config.num_hidden_layers == MODEL_TABLE[name]["num_hidden_layers"]
    assert config.hidden_size == MODEL_TABLE[name]["hidden_size"]


def test_reference_shape_matches_the_gpu_notes():
    # "4 x 7.5e9 linear parameters": Llama-3.1-8B's matmul parameters per token, head included.
    n = linear_params(resolve_model_config("llama-3.1-8b"))
    assert 7.4e9 < n < 7.6e9, n
    fewer = resolve_model_config("qwen3-30b-a3b@layers=2")
    assert fewer.num_hidden_layers == 2 and fewer.num_experts == 128


def test_smollm2_numbers_match_the_shared_config(shared_data):
    path = shared_data / "smollm2-135m-instruct" / "hf-tokenizer-config" / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    real = json.loads(path.read_text())
    for key, value in MODEL_TABLE["smollm2-135m"].items():
        assert real[key] == pytest.approx(value), key


def test_checkpoint_dir_or_config_json(tmp_path):
    data = dict(MODEL_TABLE["llama-tiny"], num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(data))
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        assert resolve_model_config(spec).num_hidden_layers == 3
    assert model_config_dict(f"{tmp_path}@layers=1")["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    "name", ["llama-tiny", "llama-tiny@attention_bias=true", "mixtral-tiny", "qwen3-moe-tiny"]
)
def test_quantized_build_packs_every_linear_but_the_head(name):
    import bitsandbytes as bnb

    config = resolve_model_config(name)
    model = build_random_model(config, device=CPU, dtype=torch.bfloat16, quant=QuantSpec(), seed=3)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") is torch.nn.Linear
    assert linears and all(t is bnb.nn.Linear4bit for t in linears.values()), linears
    assert model.is_loaded_in_4bit
    ids = torch.randint(0, config.vocab_size, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss), loss


def test_weights_are_seeded_by_name_and_match_across_quantization():
    import bitsandbytes.functional as F

    config = resolve_model_config("llama-tiny")
    dense = build_random_model(config, device=CPU, dtype=torch.float32, seed=7)
    again = build_random_model(config, device=CPU, dtype=torch.float32, seed=7)
    other = build_random_model(config, device=CPU, dtype=torch.float32, seed=8)
    q = build_random_model(config, device=CPU, dtype=torch.float32, quant=QuantSpec(), seed=7)
    for (name, a), b in zip(dense.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    w = dense.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(w, other.model.layers[1].mlp.down_proj.weight)
    # unquantized tensors are identical; the packed ones dequantize to the same weights
    assert torch.equal(dense.lm_head.weight, q.lm_head.weight)
    assert torch.equal(dense.model.layers[0].input_layernorm.weight, torch.ones(64))
    packed = q.model.layers[1].mlp.down_proj.weight
    deq = F.dequantize_4bit(packed.data, packed.quant_state).float()
    err = (deq - w).abs()
    rel = err.norm() / w.norm()
    assert rel < 0.12, f"NF4 relative error {rel:.3f} (max {err.max():.4f}, mean {err.mean():.5f})"


def test_tied_embeddings_stay_tied():
    config = resolve_model_config("smollm2-135m@layers=1,hidden_size=64,intermediate_size=128,"
                                  "num_attention_heads=4,num_key_value_heads=2,head_dim=16")  # fmt: skip
    model = build_random_model(config, device=CPU, dtype=torch.float32, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
