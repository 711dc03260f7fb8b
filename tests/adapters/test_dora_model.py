"""DoRA on the real TinyStories Llama (stories260K) in NF4: turbotune's layers vs peft's, the
saved adapter in peft, the fused-ops plugin, and training through ``run_training``."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from tests.helpers import train_steps

from turbotune.adapters.dora import DoRALinear, dora_layers

# Eager NF4 dequantization is bit for bit bitsandbytes' (what peft computes with).
pytestmark = pytest.mark.usefixtures("single_thread", "eager_ops")

pytest.importorskip("bitsandbytes")

DORA = {"method": "dora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.1}


def build(path, implementation, plugins=None, quant="nf4", seed=0, dtype=torch.bfloat16):
    from turbotune.framework import AccelerationFramework

    cfg = {
        "quantization": {"method": quant},
        "adapter": {**DORA, "implementation": implementation},
        "plugins": plugins or {},
    }
    fw = AccelerationFramework(cfg, banner=False)
    model, peft_config = fw.load_model(str(path), dtype=dtype)
    torch.manual_seed(seed)
    model, _ = fw.augment(model, None, peft_config)
    return model


def adapters(model) -> dict[str, torch.nn.Parameter]:
    return {
        n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if "lora_" in n
    }


def batches(path, n: int, batch: int = 2, seq: int = 32) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = (path.parents[1] / "tiny-shakespeare" / "tiny_shakespeare.txt").read_text()[:20_000]
    return list(torch.tensor(tok(text)["input_ids"][: n * batch * seq]).view(n, batch, seq))


# the same dropout masks on both sides
train = functools.partial(train_steps, lr=3e-3, seed=100)


def test_qdora_training_equals_peft_and_loss_falls(stories260k):
    """Same init (magnitudes equal peft's bit for bit), then 12 AdamW steps with dropout 0.1:
    the same ops in the same order and dtypes on both sides, so CPU losses are identical."""
    ref, ours = build(stories260k, "peft"), build(stories260k, "custom")
    ref_w, ours_w = adapters(ref), adapters(ours)
    assert ref_w.keys() == ours_w.keys() and len(ours_w) == 3 * 5 * 7
    assert len(dora_layers(ours)) == 5 * 7
    for name, p in ours_w.items():
        if "magnitude" in name:
            ok = torch.equal(p, ref_w[name])
            d = (p - ref_w[name]).abs().max()
            assert ok, f"initial {name}: max abs diff {d:.3e}"
    with torch.no_grad():  # identical A (its RNG order is peft's anyway; B is zero)
        for name, p in ours_w.items():
            p.copy_(ref_w[name])
    data = batches(stories260k, 12)
    ref_losses, our_losses = train(ref, data), train(ours, data)
    diffs = [abs(a - b) for a, b in zip(our_losses, ref_losses)]
    assert our_losses == ref_losses, (
        f"max abs diff {max(diffs):.3e} at step {diffs.index(max(diffs))}"
    )
    assert min(our_losses[-3:]) < our_losses[0] - 0.3, f"loss did not fall: {our_losses}"
    for name, p in ours_w.items():
        d = (p - ref_w[name]).abs().max()
        assert torch.equal(p, ref_w[name]), f"trained {name}: max abs diff {d:.3e}"


def test_saved_custom_dora_loads_in_peft(stories260k, tmp_path):
    """The custom adapter saved in peft's DoRA format (``lora_magnitude_vector`` keys,
    ``use_dora``) loads with ``PeftModel.from_pretrained`` and gives the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from turbotune.adapters.lora import save_custom_lora

    ours = build(stories260k, "custom")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapters(ours).values():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)).add_(
                0.05 * torch.randn(p.shape, generator=g)
            )
    out = save_custom_lora(ours, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    magnitudes = [k for k in keys if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 35 and len(keys) == 3 * 35, sorted(keys)[:4]

    # Resuming (the Trainer's path for custom layers) reads the same file back exactly.
    from turbotune.adapters.lora import load_custom_lora
    from turbotune.framework import AccelerationFramework

    fresh = build(stories260k, "custom", seed=9)
    load_custom_lora(fresh, out)
    for name, p in adapters(fresh).items():
        assert torch.equal(p, adapters(ours)[name]), f"reloaded {name} differs"

    fw = AccelerationFramework({"quantization": {"method": "nf4"}, "adapter": DORA}, banner=False)
    base, _ = fw.load_model(str(stories260k), dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(base, str(out))
    ids = batches(stories260k, 1)[0]
    ours.eval(), ref.eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    d = (a - b).abs()
    assert torch.equal(a, b), f"logits: max abs diff {d.max():.3e}, mean {d.mean():.3e}"


@pytest.mark.parametrize("implementation", ["custom", "peft"])
def test_fused_ops_leave_dora_projections_on_the_eager_path(stories260k, implementation):
    """The fused LoRA ops do not do DoRA: with ``fused_ops`` on, every DoRA projection keeps its
    own forward (projection_of returns None), the other kernels still apply, and the loss and
    every adapter gradient equal those of the unpatched model (up to the fused RMSNorm/RoPE/CE
    kernels' fp32 rounding)."""
    from turbotune.patches.forwards import projection_of

    plain = build(stories260k, implementation, quant="none")
    fused = build(stories260k, implementation, plugins={"fused_ops": {}}, quant="none")
    with torch.no_grad():
        for name, p in adapters(fused).items():
            p.copy_(adapters(plain)[name]).add_(0.01)
            adapters(plain)[name].copy_(p)
    layers = [m for m in fused.modules() if getattr(m, "use_dora", {}).get("default")]
    assert len(layers) == 35 and all(projection_of(m) is None for m in layers)
    if implementation == "custom":
        assert all(isinstance(m, DoRALinear) for m in layers)
    patches = fused.__dict__["_turbotune_patches"].counts
    assert patches.get("rms_norm") and patches.get("cross_entropy"), patches
    ids = batches(stories260k, 1)[0]
    fused.eval(), plain.eval()  # dropout off: the masks cannot differ
    losses = []
    for model in (plain, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    d = (losses[0] - losses[1]).abs().item()
    assert d < 1e-3, f"loss {losses[0].item():.5f} vs {losses[1].item():.5f}"
    for name, p in adapters(fused).items():
        ref = adapters(plain)[name].grad
        d = (p.grad - ref).abs()
        tol = 1e-3 * ref.abs().max() + 1e-6
        assert d.max() <= tol, f"grad {name}: max abs diff {d.max():.3e}, mean {d.mean():.3e}"


def test_qdora_trains_through_run_training(stories260k, shared_data, tmp_path):
    """``train_type: bnb_dora`` with the custom layer (what ``turbotune train`` runs; the peft
    layer computes the same losses, see above): the loss falls, the adapter is peft's DoRA."""
    from turbotune.train.run import run_training

    data = shared_data / "alpaca" / "alpaca_tiny.json"
    if not data.is_file():
        pytest.skip(f"{data} is missing")
    cfg = {
        "train_type": "bnb_dora",
        "model": {"path": str(stories260k)},
        "data": {"path": str(data), "max_length": 48, "max_samples": 8},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.05, "implementation": "custom"},
        "train": {"precision": "bf16_autocast", "max_steps": 8, "per_device_train_batch_size": 2,
                  "learning_rate": 1e-2, "warmup_steps": 0, "lr_scheduler": "constant",
                  "logging_steps": 1, "output_dir": str(tmp_path / "run"), "report_to": []},
    }  # fmt: skip
    result = run_training(cfg)
    trainer = result.trainer
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 8
    # Per-step losses of different batches are noisy: judge the loss on the training rows, with
    # the adapters on vs off (off = the untouched base, which is also where DoRA starts).
    after = trainer.evaluate(eval_dataset=trainer.train_dataset)["eval_loss"]
    for layer in dora_layers(trainer.model).values():
        layer.disable_adapters = True
    before = trainer.evaluate(eval_dataset=trainer.train_dataset)["eval_loss"]
    assert after < before - 0.3, f"training-set loss {before:.4f} (base) -> {after:.4f} (QDoRA)"
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_hqq_dora_trains_on_the_hqq_base(stories260k):
    """``train_type: hqq_dora``: turbotune's DoRA layers over the HQQ loader's HQQLinear
    layers (read through dense_weight); starts as the base model and the loss falls."""
    from turbotune.framework import AccelerationFramework

    fw = AccelerationFramework(
        {"train_type": "hqq_dora", "adapter": {"r": 8, "alpha": 16}}, banner=False
    )
    model, peft_config = fw.load_model(str(stories260k), dtype=torch.bfloat16)
    ids = batches(stories260k, 1)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    torch.manual_seed(0)
    model, _ = fw.augment(model, None, peft_config)
    layers = dora_layers(model)
    assert len(layers) == 35
    assert {type(m.base_layer).__name__ for m in layers.values()} == {"HQQLinear"}
    with torch.no_grad():
        # m starts as the bf16-rounded norm; set to the exact one, DoRA is the identity exactly
        # ((m / ||W|| - 1) = 0, B = 0): the HQQ weight is read, normed and reused correctly.
        for layer in layers.values():
            layer.lora_magnitude_vector["default"].weight.copy_(layer.weight_norm(torch.float32))
        start = model(input_ids=ids).logits.float()
    d = (start - before).abs()
    assert torch.equal(start, before), (
        f"init logits: max abs diff {d.max():.3e}, mean {d.mean():.3e}"
    )
    losses = train(model, batches(stories260k, 8), lr=1e-2)
    assert min(losses[-3:]) < losses[0] - 0.2, f"loss did not fall: {losses}"


def test_merge_of_a_custom_dora_adapter(stories260k, tmp_path):
    """``turbotune merge`` folds the saved DoRA adapter into the base (peft's DoRA merge):
    the merged model's logits equal the adapted model's."""
    from transformers import AutoModelForCausalLM

    from turbotune.adapters.lora import save_custom_lora
    from turbotune.train.merge import merge_adapter

    ours = build(stories260k, "custom", quant="none", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapters(ours).values():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)).add_(
                0.05 * torch.randn(p.shape, generator=g)
            )
    adapter = save_custom_lora(ours, tmp_path / "adapter", str(stories260k))
    merged_dir = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    ids = batches(stories260k, 1)[0]
    ours.eval(), merged.eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, merged(input_ids=ids).logits
    d = (a - b).abs()
    # fp32 on both sides; merging reorders the sums (W' x vs W x + k s B A x).
    assert d.max() < 1e-3, f"logits: max abs diff {d.max():.3e}, mean {d.mean():.3e}"
