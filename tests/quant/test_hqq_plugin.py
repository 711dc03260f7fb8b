"""The HQQ loader plugin on the real stories260K model: what it quantizes, fused vs unfused
training, ``train_type: hqq_lora`` through ``run_training``, peft's LoRA on HQQ bases, and
``hqq_llama_pro``. Model-level runs take the eager op references (the Triton dequantizer is
checked against them in test_hqq.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from tests.helpers import train_steps
from torch import nn

from turbotune.errors import ConfigError
from turbotune.quant.hqq_linear import HQQLinear, count_hqq_linears

pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")


def _framework(fused: bool, **quant):
    from turbotune.framework import AccelerationFramework

    cfg = {
        "train_type": "hqq_lora",
        "quantization": {"compute_dtype": "float32", "group_size": 32, **quant},
        "adapter": {"r": 8, "alpha": 16},
        "plugins": {"fused_ops": {}} if fused else {},
    }
    return AccelerationFramework(cfg, banner=False)


def _batches(steps: int, batch: int = 2, seq: int = 32, vocab: int = 512):
    g = torch.Generator().manual_seed(7)
    start = torch.randint(0, vocab, (steps, batch, 1), generator=g)
    stride = torch.randint(1, 4, (steps, batch, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % vocab
    return list(ids)


# from_pretrained gives eval mode, where attention keeps its unfused path
_train = functools.partial(train_steps, lr=3e-3, train_mode=True)


def test_plugin_quantizes_every_linear_but_the_head(stories260k):
    fw = _framework(False, skip_modules=["down_proj"])
    model, _ = fw.load_model(str(stories260k))
    assert count_hqq_linears(model) == 5 * 6  # q, k, v, o, gate, up per layer; down skipped
    assert (
        type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    )
    assert not any(p.requires_grad for p in model.parameters())
    assert "hqq bits=4 group_size=32" in fw.plugin("hqq").describe()


def test_hqq_base_fused_training_matches_unfused(stories260k, monkeypatch):
    from turbotune.patches import forwards

    calls = []  # which fused ops ran (an HQQ base must not fall back to the original forwards)
    for name in ("lora_projections", "lora_mlp"):
        real = getattr(forwards, name)
        monkeypatch.setattr(
            forwards, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k)
        )

    def build(fused):
        fw = _framework(fused)
        model, peft_config = fw.load_model(str(stories260k))
        torch.manual_seed(0)
        model, _ = fw.augment(model, None, peft_config)
        return model

    batches = _batches(6)
    ref_model, ours_model = build(False), build(True)
    assert count_hqq_linears(ours_model) == 35
    ref, ours = _train(ref_model, batches), _train(ours_model, batches)
    diffs = [abs(a - b) / b for a, b in zip(ours, ref)]
    assert max(diffs) < 2e-5, f"losses fused {ours} vs unfused {ref}"
    # per step and layer: q/k/v as one group and o_proj alone (2 calls), the MLP as one op
    assert calls.count("lora_projections") == 6 * 5 * 2 and calls.count("lora_mlp") == 6 * 5, calls[
        :8
    ]
    assert ours[-1] < ours[0], ours


def test_train_type_hqq_lora_lowers_the_loss(stories260k, shared_data, tmp_path):
    from turbotune.train.run import run_training

    cfg = {
        "train_type": "hqq_lora",
        "model": {"path": str(stories260k)},
        "data": {"path": str(shared_data / "alpaca" / "alpaca_tiny.json"), "max_length": 64, "max_samples": 32},
        "quantization": {"compute_dtype": "float32", "group_size": 32},
        "adapter": {"r": 8, "alpha": 16},
        "train": {
            "precision": "fp32", "max_steps": 8, "per_device_train_batch_size": 8,
            "learning_rate": 1e-2, "lr_scheduler": "constant", "logging_steps": 1,
            "output_dir": str(tmp_path / "run"), "report_to": [],
        },
        "plugins": {"fused_ops": {}},
    }  # fmt: skip
    result = run_training(cfg)
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    assert count_hqq_linears(result.trainer.model) == 35
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_config_errors_and_train_type():
    from turbotune.config import load_config
    from turbotune.plugins.registry import activate

    cfg = load_config({"train_type": "hqq_lora", "quantization": {"bits": 9}})
    with pytest.raises(ConfigError, match=r"bits must be 1\.\.8"):
        activate(cfg)
    cfg = load_config({"quantization": {"method": "hqq"}, "adapter": {"method": "full"}})
    with pytest.raises(ConfigError, match="cannot be trained in full"):
        activate(cfg)
    assert load_config({"train_type": "hqq_lora"}).adapter.implementation == "custom"


def test_peft_lora_on_hqq_trains_like_the_custom_layers(stories260k, tmp_path):
    """``adapter.implementation: peft`` on an HQQ base: peft's LoRA layers wrap every HQQLinear
    (``all-linear`` spelled out) and train with the same losses as turbotune's own (fp32)."""
    from peft import PeftModel

    def build(implementation):
        from turbotune.framework import AccelerationFramework

        cfg = {
            "quantization": {"method": "hqq", "compute_dtype": "float32", "group_size": 32},
            "adapter": {"r": 8, "alpha": 16, "implementation": implementation},
        }
        fw = AccelerationFramework(cfg, banner=False)
        model, peft_config = fw.load_model(str(stories260k))
        torch.manual_seed(0)
        return fw.augment(model, None, peft_config)[0]

    peft_model, custom = build("peft"), build("custom")
    assert isinstance(peft_model, PeftModel)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, HQQLinear) and "default" in q.lora_A
    n_adapted = sum(
        isinstance(m, HQQLinear) for n, m in peft_model.named_modules() if n.endswith("base_layer")
    )
    assert n_adapted == 35
    batches = _batches(4)
    ours, ref = _train(peft_model, batches), _train(custom, batches)
    diffs = [abs(a - b) / b for a, b in zip(ours, ref)]
    assert max(diffs) < 1e-6, f"peft {ours} vs custom {ref}"
    # saved as a peft adapter (targets spelled out) that loads on the dense base
    from transformers import AutoModelForCausalLM

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    dense = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(dense, str(tmp_path / "adapter"))
    assert sorted(loaded.peft_config["default"].target_modules) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip


def test_hqq_llama_pro_keeps_new_blocks_dense_and_trains_only_them(stories260k, tmp_path):
    from turbotune.expand import expand_checkpoint
    from turbotune.framework import AccelerationFramework

    expand_checkpoint(stories260k, tmp_path / "pro", new_blocks=2, progress=False)
    cfg = {
        "train_type": "hqq_llama_pro",
        "quantization": {"compute_dtype": "float32", "group_size": 32},
    }
    fw = AccelerationFramework(cfg, banner=False)
    model, peft_config = fw.load_model(str(tmp_path / "pro"))
    model, _ = fw.augment(model, None, peft_config)
    kinds = [type(layer.mlp.down_proj).__name__ for layer in model.model.layers]
    assert kinds == ["HQQLinear"] * 3 + ["Linear"] + ["HQQLinear"] * 2 + ["Linear"], kinds
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("model.layers.3.", "model.layers.6.")) for n in trainable
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, _batches(3))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("model.layers.3.", "model.layers.6.")) for k in changed), (
        changed
    )


def test_streamed_load_equals_from_pretrained_then_quantize(stories260k, tmp_path):
    """The loader reads the checkpoint tensor by tensor, quantizing as it goes; the model is the
    one from_pretrained + quantize_linears gives (storage, dense tensors, tied head, logits)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from turbotune.config import ModelConfig, QuantizationConfig
    from turbotune.modeling import load_causal_lm
    from turbotune.plugins.hqq import HQQQuantPlugin
    from turbotune.quant.hqq_load import stream_hqq_checkpoint

    cpu = torch.device("cpu")
    plugin = HQQQuantPlugin(
        QuantizationConfig(method="hqq", compute_dtype="float32", group_size=32)
    )
    streamed = plugin.stream(str(stories260k), cpu, "sdpa", ())
    assert streamed is not None and count_hqq_linears(streamed) == 35
    ref = load_causal_lm(ModelConfig(path=str(stories260k)), torch.float32)
    plugin.quantize(ref, cpu)
    ours, want = streamed.state_dict(), ref.state_dict()
    assert ours.keys() == want.keys()
    for key, tensor in want.items():
        got = ours[key]
        assert got.dtype == tensor.dtype and torch.equal(
            got.view(torch.uint8), tensor.view(torch.uint8)
        ), key
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, as in the config
    assert streamed.config.name_or_path == str(stories260k) and not streamed.training
    ids = torch.randint(0, 512, (2, 12))
    assert torch.equal(streamed(ids).logits, ref(ids).logits)
    # a checkpoint whose names are not the model's (here: one extra tensor) is left to from_pretrained
    odd = tmp_path / "odd"
    shutil.copytree(stories260k, odd)
    state = load_file(str(odd / "model.safetensors"))
    save_file({**state, "extra.weight": torch.zeros(2)}, str(odd / "model.safetensors"))
    kw = dict(compute_dtype=torch.float32, device=cpu, make_layer=None, skip_modules=("lm_head",))
    assert stream_hqq_checkpoint(str(odd), **kw) is None
    assert stream_hqq_checkpoint(str(tmp_path / "missing"), **kw) is None


def test_merge_of_an_adapter_trained_on_hqq(stories260k, shared_data, tmp_path):
    """``turbotune merge`` of an hqq_lora adapter: the base is rebuilt as training saw it (the HQQ
    round trip of every quantized weight), so the merged model gives the trained model's logits."""
    import shutil

    import yaml
    from transformers import AutoModelForCausalLM

    from turbotune.train.merge import merge_adapter
    from turbotune.train.run import run_training

    cfg = {
        "train_type": "hqq_lora",
        "model": {"path": str(stories260k)},
        "data": {"path": str(shared_data / "alpaca" / "alpaca_tiny.json"), "max_length": 64, "max_samples": 16},
        "quantization": {"compute_dtype": "float32", "group_size": 32},
        "adapter": {"r": 8, "alpha": 16},
        "train": {
            "precision": "fp32", "max_steps": 3, "per_device_train_batch_size": 8,
            "learning_rate": 1e-2, "output_dir": str(tmp_path / "run"), "report_to": [],
        },
    }  # fmt: skip
    result = run_training(cfg)
    trained = result.trainer.model.eval()
    merged_dir = merge_adapter(result.output_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.arange(1, 33).view(1, 32)
    # The control: the same adapter merged into the dense base, as if it had not been quantized
    # (what merge did before it knew HQQ), must miss the trained model by far more.
    plain = tmp_path / "plain-adapter"
    shutil.copytree(result.output_dir, plain)
    saved = yaml.safe_load((plain / "turbotune.yaml").read_text())
    saved["quantization"] = {"method": "none"}
    (plain / "turbotune.yaml").write_text(yaml.safe_dump(saved))
    plain_dir = merge_adapter(plain, tmp_path / "merged-plain", dtype="float32")
    merged_plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
        no_round_trip = merged_plain(input_ids=ids).logits
    d = (got - want).abs().max().item()
    assert d < 1e-4, f"merged vs trained HQQ model: max abs diff {d:.3g}"
    d_plain = (no_round_trip - want).abs().max().item()
    assert d_plain > 100 * max(d, 1e-6), f"without the round trip: {d_plain:.3g} vs {d:.3g}"
