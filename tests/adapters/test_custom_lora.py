"""turbotune's own LoRA layers (custom_lora / custom_qlora) against peft's.

The custom layers repeat peft's computation op for op (same casts, same order), so given the
same adapter weights every comparison with peft here is *exact* (``torch.equal``), on a dense
and on an NF4 base; only an adapter moved from a 4-bit base to a dense one is merely close.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from tests.helpers import train_steps
from torch import nn

from turbotune.adapters.lora import (
    LoRALinear,
    apply_custom_lora,
    custom_lora_layers,
    is_custom_lora_model,
    load_custom_lora,
    save_custom_lora,
)
from turbotune.adapters.peft_lora import lora_config
from turbotune.config import AdapterConfig
from turbotune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} vs {ref.dtype}"
    diff = (ours.float() - ref.float()).abs()
    assert torch.equal(ours, ref), f"{what}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def nf4_linear(n_in: int, n_out: int, compute=torch.bfloat16, bias=False) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(n_in, n_out, bias=bias)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = nn.Parameter(dense.bias.data.to(compute), requires_grad=False)
    return q.to("cpu")  # quantizes


class Holder(nn.Module):
    """A one-projection model; ``scale`` stands for the non-quantized weights (norms) of a real
    model, whose dtype is the compute dtype that ``weights_dtype: compute`` resolves to."""

    def __init__(self, proj: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_pair(base: nn.Module, cfg: AdapterConfig, compute: torch.dtype):
    """(peft LoRA layer, custom LoRA layer) over the *same* frozen base, with equal random A, B."""
    from turbotune.adapters.peft_lora import apply_lora

    base.requires_grad_(False)
    config = lora_config(cfg)
    config.task_type = None  # a bare module, not a causal LM
    holder = Holder(base, compute)
    # peft takes its 4-bit layer only for models flagged so (as every transformers 4-bit load
    # and turbotune's bench builder are); the custom layer goes by the base's type.
    holder.is_loaded_in_4bit = (
        not isinstance(base.weight, nn.Parameter) or base.weight.dtype == torch.uint8
    )
    adapter_dtype = compute if cfg.weights_dtype == "compute" else None
    ref = apply_lora(holder, config, adapter_dtype=adapter_dtype).base_model.model.proj
    ours = apply_custom_lora(Holder(base, compute), cfg).proj
    assert isinstance(ours, LoRALinear)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for part in ("lora_A", "lora_B"):  # B non-zero: the update must matter
            w = torch.randn(getattr(ref, part)["default"].weight.shape, generator=g) * 0.3
            getattr(ref, part)["default"].weight.copy_(w)
            getattr(ours, part)["default"].weight.copy_(w)
    return ref, ours


def run(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, seed: int = 0):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout mask on both sides
    y = layer(x)
    y.backward(grad_out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return y, x.grad, a.grad, b.grad


CASES = {
    # name: (base builder, input dtype, weights_dtype, extra adapter keys)
    "dense-fp32": (lambda: nn.Linear(37, 53, bias=True), torch.float32, "float32", {}),
    "dense-bf16-fp32-adapter": (lambda: nn.Linear(37, 53).to(torch.bfloat16), torch.bfloat16, "float32", {}),
    "dense-bf16-bf16-adapter": (lambda: nn.Linear(37, 53).to(torch.bfloat16), torch.bfloat16, "compute", {}),
    "dense-fp32-rslora-dropout": (lambda: nn.Linear(37, 53), torch.float32, "float32",
                                  {"use_rslora": True, "dropout": 0.3}),
    "nf4-fp32-adapter": (lambda: nf4_linear(64, 48), torch.bfloat16, "float32", {}),
    "nf4-bf16-adapter": (lambda: nf4_linear(64, 48), torch.bfloat16, "compute", {}),
    "nf4-bias-fp32-input": (lambda: nf4_linear(64, 48, compute=torch.float32, bias=True), torch.float32,
                            "float32", {"dropout": 0.2}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_layer_forward_and_gradients_equal_peft(case):
    make_base, x_dtype, weights_dtype, extra = CASES[case]
    base = make_base()
    cfg = AdapterConfig(r=4, alpha=8, target_modules=["proj"], weights_dtype=weights_dtype, **extra)
    ref, ours = layer_pair(base, cfg, x_dtype)
    expect_dtype = x_dtype if weights_dtype == "compute" else torch.float32
    assert ours.lora_A["default"].weight.dtype == ref.lora_A["default"].weight.dtype == expect_dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, base.in_features, generator=g).to(x_dtype)
    grad_out = torch.randn(3, 5, base.out_features, generator=g).to(x_dtype)
    for name, o, r in zip(
        ("output", "grad x", "grad A", "grad B"), run(ours, x, grad_out), run(ref, x, grad_out)
    ):
        assert_same(o, r, f"{case} {name}")


def test_layer_matches_the_formula():
    """Independent of peft: ``base(x) + (x @ A^T @ B^T) * alpha / r`` on a dense fp32 base."""
    base = nn.Linear(37, 53).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 5, 37)
    diff = (layer(x) - (base(x) + (x @ a.T @ b.T) * 2.0)).abs()
    assert diff.max() < 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_layer_state_and_fused_op_recognition():
    from turbotune.patches.forwards import is_lora_linear, projection_of

    base = nn.Linear(16, 24)
    layer = LoRALinear(base, r=4, alpha=16, dropout=0.1, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(16 / 2)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(24, 4))  # update starts at 0
    assert layer.weight is base.weight and layer.active_adapters == ["default"]
    base.requires_grad_(False)
    # The fused ops take it for a peft layer: same weights, scaling and (training) dropout.
    assert is_lora_linear(layer)
    proj = projection_of(layer)
    assert proj is not None and proj.base is base
    assert (
        proj.lora.A is layer.lora_A["default"].weight
        and proj.lora.B is layer.lora_B["default"].weight
    )
    assert (proj.lora.scaling, proj.lora.dropout) == (8.0, 0.1)
    layer.disable_adapters = True
    assert projection_of(layer) is None  # falls back to the module's forward
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), base(x))


# --- whole models (stories260K) ------------------------------------------------------------------

LORA = {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}


def build(path, implementation: str, quant: str = "nf4", seed: int = 0, **adapter):
    from turbotune.framework import AccelerationFramework

    if quant != "none":
        pytest.importorskip("bitsandbytes")
    cfg = {
        "quantization": {"method": quant},
        "adapter": {**LORA, "implementation": implementation, **adapter},
    }
    fw = AccelerationFramework(cfg, banner=False)
    model, peft_config = fw.load_model(str(path), dtype=torch.bfloat16)
    torch.manual_seed(seed)
    model, _ = fw.augment(model, None, peft_config)
    return model


def adapters(model) -> dict[str, torch.Tensor]:
    """Adapter parameters by the custom model's names (peft's wrapper prefix removed)."""
    return {
        n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if "lora_" in n
    }


def randomize(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def batches(path, n: int, batch: int = 4, seq: int = 48):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = (path.parents[1] / "tiny-shakespeare" / "tiny_shakespeare.txt").read_text()[:40_000]
    return list(torch.tensor(tok(text)["input_ids"][: n * batch * seq]).view(n, batch, seq))


train = functools.partial(train_steps, lr=1e-3)


def test_same_seed_same_init_as_peft(stories260k):
    ref, ours = build(stories260k, "peft", seed=4), build(stories260k, "custom", seed=4)
    ref_w, ours_w = adapters(ref), adapters(ours)
    assert ref_w.keys() == ours_w.keys() and len(ours_w) == 2 * 5 * 7
    for name, p in ours_w.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert_same(p.detach(), ref_w[name].detach(), name)


def test_qlora_training_losses_equal_peft(stories260k):
    data = batches(stories260k, 20, batch=2, seq=32)
    ref, ours = build(stories260k, "peft"), build(stories260k, "custom")
    ref_w, ours_w = adapters(ref), adapters(ours)
    with torch.no_grad():  # identical start, whatever the RNG order
        for name, p in ours_w.items():
            p.copy_(ref_w[name])
    ref_losses, our_losses = train(ref, data, lr=3e-3), train(ours, data, lr=3e-3)
    # Tolerance 0: same NF4 weights, the same ops in the same order and dtypes on both sides
    # (forward, backward and AdamW), so CPU runs are bit-identical; any drift means the
    # computations differ.
    diffs = [abs(a - b) for a, b in zip(our_losses, ref_losses)]
    assert our_losses == ref_losses, (
        f"max abs diff {max(diffs):.3e} at step {diffs.index(max(diffs))}"
    )
    assert our_losses[-1] < our_losses[0] - 0.3, (
        f"loss did not fall: {our_losses[0]:.3f} -> {our_losses[-1]:.3f}"
    )
    for name, p in ours_w.items():
        assert_same(p.detach(), ref_w[name].detach(), f"trained {name}")


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_in_peft(path, adapter_dir, quant: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {"dtype": torch.bfloat16}
    if quant:
        from turbotune.quant.bnb import bnb_config

        kw.update(quantization_config=bnb_config({"method": "nf4"}), device_map={"": "cpu"})
        assert isinstance(kw["quantization_config"], BitsAndBytesConfig)
    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, **kw), str(adapter_dir)
    )


def test_saved_adapter_is_peft_format_and_loads_in_peft(stories260k, tmp_path):
    from safetensors.torch import load_file

    ids = batches(stories260k, 1, batch=2, seq=32)[0]
    # The same adapter on both sides; peft saves its own for the reference format.
    ref, ours = build(stories260k, "peft"), build(stories260k, "custom")
    randomize(ref)
    randomize(ours)
    ref.save_pretrained(str(tmp_path / "peft"))
    ours.save_pretrained(str(tmp_path / "ours"))  # what Trainer.save_model calls
    ref_sd, our_sd = (
        load_file(tmp_path / "peft/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert our_sd.keys() == ref_sd.keys()
    for key in our_sd:
        assert_same(our_sd[key], ref_sd[key], key)
    ref_cfg, our_cfg = (
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")
    )
    for key in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "peft_type",
        "task_type",
        "inference_mode",
    ):
        assert our_cfg[key] == ref_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(ref_cfg["target_modules"])
    assert our_cfg["base_model_name_or_path"] == str(stories260k)

    # On a 4-bit base, peft computes exactly what the in-memory custom model computes.
    expect = logits(ours, ids)
    assert_same(
        logits(load_in_peft(stories260k, tmp_path / "ours", quant=True), ids),
        expect,
        "4-bit logits",
    )
    # On the dense base peft computes what a dense custom model with these adapters computes...
    dense = load_in_peft(stories260k, tmp_path / "ours", quant=False)
    twin = build(stories260k, "custom", quant="none")
    with torch.no_grad():
        for name, p in adapters(twin).items():
            p.copy_(adapters(ours)[name])
    got = logits(dense, ids)
    assert_same(got, logits(twin, ids), "dense logits vs a dense custom model")
    # ...which is close to the 4-bit model: the adapter is exact, so they differ by the base's
    # quantization error, of the size the bare dense and 4-bit bases show (1.17x measured).
    with dense.disable_adapter():
        bare_dense = logits(dense, ids)
    for layer in custom_lora_layers(ours).values():
        layer.disable_adapters = True
    bare_gap = (bare_dense - logits(ours, ids)).abs().mean()
    gap = (got - expect).abs().mean()
    assert gap < 1.5 * bare_gap, (
        f"mean abs diff {gap:.3e} vs the bare quantization gap {bare_gap:.3e}"
    )


def test_custom_lora_dense_roundtrip_through_peft_and_resume(stories260k, tmp_path):
    ids = batches(stories260k, 1, batch=2, seq=32)[0]
    ours = build(stories260k, "custom", quant="none")
    randomize(ours)
    save_custom_lora(ours, tmp_path / "a", "my/base")
    assert (
        json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"]
        == "my/base"
    )
    assert_same(
        logits(load_in_peft(stories260k, tmp_path / "a", quant=False), ids),
        logits(ours, ids),
        "dense logits",
    )
    # Resuming: a fresh custom model takes the saved weights back exactly.
    fresh = build(stories260k, "custom", quant="none", seed=9)
    load_custom_lora(fresh, tmp_path / "a")
    for name, p in adapters(fresh).items():
        assert_same(p.detach(), adapters(ours)[name].detach(), name)
    other = build(stories260k, "custom", quant="none", r=4)
    with pytest.raises(ValueError, match="rank"):
        load_custom_lora(other, tmp_path / "a")


@pytest.mark.parametrize("train_type", ["custom_qlora", "custom_lora"])
def test_train_types_build_through_framework(stories260k, train_type):
    from peft import PeftModel

    from turbotune.framework import AccelerationFramework

    if train_type == "custom_qlora":
        pytest.importorskip("bitsandbytes")
    fw = AccelerationFramework(
        {"train_type": train_type, "adapter": {"r": 4, "alpha": 8}}, banner=False
    )
    assert "(custom)" in fw.plugin("adapter").describe()
    model, peft_config = fw.load_model(str(stories260k), dtype=torch.bfloat16)
    assert peft_config.r == 4 and peft_config.lora_alpha == 8
    model, _ = fw.augment(model, None, peft_config)
    assert not isinstance(model, PeftModel) and is_custom_lora_model(model)
    layers = custom_lora_layers(model)
    assert len(layers) == 5 * 7 and "lm_head" not in layers and isinstance(model.lm_head, nn.Linear)
    assert all(layer._quantized_base == (train_type == "custom_qlora") for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if "lora_" in n}
    ids = batches(stories260k, 1, batch=2, seq=16)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(
        g is not None for g in grads.values()
    )  # B starts at zero: only B's grads are non-zero
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_trainer_accepts_and_saves_custom_qlora(stories260k, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build(stories260k, "custom")
    randomize(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no"
    )
    trainer = Trainer(model=model, args=args)  # a bare 4-bit model is refused; this one is not
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
    } <= files and "model.safetensors" not in files
    fresh = build(stories260k, "custom", seed=9)
    load_custom_lora(fresh, tmp_path / "final")
    for name, p in adapters(fresh).items():
        assert_same(p.detach(), adapters(model)[name].detach(), name)


def test_checkpointing_gives_adapter_gradients(stories260k):
    from transformers import TrainingArguments

    from turbotune.framework import AccelerationFramework

    fw = AccelerationFramework({"train_type": "custom_lora", "adapter": LORA}, banner=False)
    model, peft_config = fw.load_model(str(stories260k), dtype=torch.float32)
    args = TrainingArguments(
        output_dir="unused", use_cpu=True, report_to=[], gradient_checkpointing=True
    )
    model, _ = fw.augment(model, args, peft_config)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    ids = batches(stories260k, 1, batch=2, seq=16)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "adapter, match",
    [({"method": "llama_pro"}, "turbotune expand"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
     ({"target_modules": ["nothing_here"]}, "matches no module"), ({"target_modules": ["mlp"]}, "LlamaMLP")],
)  # fmt: skip
def test_unsupported_options_are_config_errors(stories260k, adapter, match):
    with pytest.raises(ConfigError, match=match):
        build(stories260k, "custom", quant="none", **adapter)


def test_fused_ops_patch_custom_layers_and_train_alike(stories260k, monkeypatch):
    """The fused_ops plugin recognises the custom layers as it does peft's (eager op paths)."""
    from turbotune.patches import KINDS, apply_patches
    from turbotune.patches.forwards import projection_of

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' eager references: fast on CPU
    ref, ours = (build(stories260k, "custom", quant="none") for _ in range(2))
    for model in (ref, ours):
        model.float()
        randomize(model)
    patches = apply_patches(ours, KINDS)
    # q/k/v/o go through the LoRA-fused projection, gate/up/down through the fused MLP.
    assert patches.counts.get("lora") == 5 * 4 and patches.counts.get("swiglu") == 5
    # ...and the fused ops take every layer (a ``None`` would fall back to the module forward).
    assert all(projection_of(layer) is not None for layer in custom_lora_layers(ours).values())
    data = batches(stories260k, 6, batch=2, seq=32)
    ref_losses, our_losses = train(ref, data, lr=3e-3), train(ours, data, lr=3e-3)
    patches.undo()
    # fp32 throughout: only summation order differs (fused matmuls, chunked cross-entropy).
    rel = max(abs(a - b) / abs(b) for a, b in zip(our_losses, ref_losses))
    assert rel < 2e-5, f"max rel loss diff {rel:.2e}: {our_losses} vs {ref_losses}"
