"""The MLX backend on the real TinyStories Llama (260K): LoRA and 4-bit LoRA lower the held-out
loss, the saved PEFT adapter reproduces MLX's logits in peft, the mlx-lm adapter reloads in
mlx-lm, and the converter gives the same PEFT adapter.

Two short runs are shared by the tests of this module: LoRA through the command line
(``turbotune train mlx-lora --backend mlx ...``) and 4-bit QLoRA through the Python API.
Runs on Linux through ``mlx[cpu]`` (reference BLAS: slow, so the runs are kept tiny).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'turbotune[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'turbotune[mlx]')")

from mlx_lm.tuner.utils import load_adapters  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from turbotune.backends.mlx.export import convert_mlx_adapter  # noqa: E402
from turbotune.backends.mlx.model import base_weights, quantize_base  # noqa: E402
from turbotune.backends.mlx.train import (  # noqa: E402
    build_mlx_run,
    evaluate,
    fit_mlx,
    make_loss_and_grad,
    save_final,
    step_gradients,
)
from turbotune.config import load_config  # noqa: E402

#: fp32 end to end; MLX and PyTorch order their float sums differently (measured max ~1e-5).
LOGITS_ATOL = 1e-4
STEPS = 8
IDS = np.array([[1, 5, 60, 300, 20, 7, 99, 12, 44, 3], [1, 400, 3, 30, 50, 70, 9, 11, 2, 8]])


def run_overrides(shared: Path, out: Path, quant: str) -> list[str]:
    return [
        f"model.path={shared / 'stories260K' / 'hf'}",
        f"data.path={shared / 'alpaca' / 'alpaca_tiny.json'}",
        "data.max_samples=40", "data.eval_ratio=0.2", "data.max_length=64",
        f"quantization.method={quant}", "train.precision=fp32", f"train.max_steps={STEPS}",
        "train.per_device_train_batch_size=4", "train.learning_rate=3e-3",
        "train.logging_steps=2", "train.eval_steps=4", f"train.output_dir={out}",
    ]  # fmt: skip


@dataclass
class Trained:
    final: Path
    output_dir: Path
    before: float
    after: float
    model: Any = field(repr=False)  # MLX model with the trained LoRA layers


@pytest.fixture(scope="module")
def lora(shared_data, stories260k, tmp_path_factory) -> Trained:
    """LoRA through the CLI: `turbotune train mlx-lora --backend mlx` plus overrides."""
    from turbotune.cli import main

    out = tmp_path_factory.mktemp("mlx-lora")
    overrides = run_overrides(shared_data, out, "none")
    before = evaluate(build_mlx_run(load_config({"backend": "mlx"}, overrides)))
    assert main(["train", "--backend", "mlx", "mlx-lora", *overrides]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    model, _ = load_model(stories260k)
    model = load_adapters(model, str(out / "final" / "mlx"))
    return Trained(out / "final", out, before, lines[-1]["eval_loss"], model)


@pytest.fixture(scope="module")
def qlora(shared_data, tmp_path_factory) -> Trained:
    """4-bit QLoRA through the Python API."""
    out = tmp_path_factory.mktemp("mlx-qlora")
    cfg = load_config({"backend": "mlx"}, run_overrides(shared_data, out, "nf4"))
    run = build_mlx_run(cfg)
    before = evaluate(run)
    metrics = fit_mlx(run)
    save_final(run, out / "final")
    return Trained(out / "final", out, before, metrics["eval_loss"], run.model)


@pytest.fixture(params=["lora", "qlora"])
def trained(request) -> Trained:
    return request.getfixturevalue(request.param)


def test_training_lowers_the_held_out_loss(trained):
    # Measured on 8 held-out rows: LoRA 3.80 -> 3.27, 4-bit 3.80 -> 3.32 in 8 steps of 4 rows.
    assert trained.after < trained.before - 0.3, f"eval loss {trained.before} -> {trained.after}"


def test_metrics_log_has_the_trainer_metrics(trained):
    lines = [json.loads(x) for x in (trained.output_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [x for x in lines if "loss" in x]
    assert [x["step"] for x in logs] == list(range(2, STEPS + 1, 2))
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "input_tokens_per_s",
                "step_time_s", "peak_mem_gib", "epoch"):  # fmt: skip
        assert all(np.isfinite(x[key]) for x in logs), key
    assert all(x["tokens_per_s"] > 0 and x["peak_mem_gib"] > 0 for x in logs)
    evals = [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x]
    assert [step for step, _ in evals] == [4, STEPS], evals  # eval_steps=4, then the final one
    assert evals[-1][1] == pytest.approx(trained.after) and lines[-1]["step"] == STEPS


def _torch_base(stories260k: Path, weights: dict[str, Any] | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    if weights is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def _peft_logits(base, adapter: Path) -> tuple[np.ndarray, np.ndarray]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        with_adapter = model(torch.from_numpy(IDS)).logits.numpy()
        with model.disable_adapter():
            without = model(torch.from_numpy(IDS)).logits.numpy()
    return with_adapter, without


def _check_close(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    diff = np.abs(got - want)
    assert diff.max() < LOGITS_ATOL, f"max abs diff {diff.max():.3g} (mean {diff.mean():.3g})"
    effect = np.abs(want - base).max()  # the adapter must matter far beyond the tolerance
    assert effect > 1000 * LOGITS_ATOL, f"the adapter changes the logits by only {effect:.3g}"


def test_peft_adapter_gives_mlx_logits(lora, stories260k):
    cfg = json.loads((lora.final / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert Path(cfg["base_model_name_or_path"]) == stories260k.resolve()
    got, without = _peft_logits(_torch_base(stories260k), lora.final)
    _check_close(got, np.array(lora.model(mx.array(IDS))), without)


def test_four_bit_adapter_in_peft_on_the_dequantized_base(qlora, stories260k):
    """peft on MLX's dequantized 4-bit base gives MLX's logits (quantized base + LoRA)."""
    weights = base_weights(qlora.model)
    original = _torch_base(stories260k).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    err = np.abs(np.array(weights[q]) - original[q].numpy()).max()
    assert 1e-4 < err < 0.2, f"{q} was not 4-bit quantized (max error {err:.3g})"
    kept = "model.layers.0.mlp.down_proj.weight"  # input width 172: no MLX group of 64 fits
    np.testing.assert_array_equal(np.array(weights[kept]), original[kept].numpy())
    got, without = _peft_logits(_torch_base(stories260k, weights), qlora.final)
    _check_close(got, np.array(qlora.model(mx.array(IDS))), without)


def test_dequantized_base_is_the_base_the_run_trained_on(qlora, shared_data):
    from turbotune.backends.mlx import dequantized_base

    cfg = load_config({"backend": "mlx"}, run_overrides(shared_data, Path("unused"), "nf4"))
    again = dequantized_base(cfg)
    trained_on = base_weights(qlora.model)
    assert set(again) == set(trained_on)
    for name, value in trained_on.items():
        np.testing.assert_array_equal(again[name], np.array(value), err_msg=name)


def test_mlx_adapter_reloads_in_mlx_lm(qlora, stories260k):
    model, _ = load_model(stories260k)
    report = quantize_base(model, "affine", 4, 64, skip=["lm_head"])
    assert len(report.quantized) == 30 and len(report.kept) == 5
    model = load_adapters(model, str(qlora.final / "mlx"))
    want = np.array(qlora.model(mx.array(IDS)))
    np.testing.assert_allclose(np.array(model(mx.array(IDS))), want, atol=1e-6, rtol=0)


def test_converter_gives_the_same_peft_adapter(lora, tmp_path, stories260k):
    from safetensors.numpy import load_file

    from turbotune.cli import main

    out = tmp_path / "peft"
    assert main(["convert-adapter", str(lora.final / "mlx"), "--out", str(out)]) == 0
    want = load_file(str(lora.final / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(want) and len(got) == 2 * 35
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16.0)
    got_logits, without = _peft_logits(_torch_base(stories260k), out)
    _check_close(got_logits, np.array(lora.model(mx.array(IDS))), without)


def test_converter_refuses_a_directory_that_is_not_an_adapter(tmp_path):
    from turbotune.errors import TurbotuneError

    with pytest.raises(TurbotuneError, match="not an mlx-lm adapter directory"):
        convert_mlx_adapter(tmp_path, tmp_path / "out")


def test_accumulated_micro_batches_equal_one_batch(qlora, shared_data):
    """Loss normalized by the step's target tokens: 2 micro-batches of 2 rows = 1 batch of 4."""

    from turbotune.backends.mlx.data import to_batch

    cfg = load_config({"backend": "mlx"}, run_overrides(shared_data, Path("unused"), "nf4"))
    from turbotune.data import build_datasets
    from turbotune.modeling import load_tokenizer

    rows = [build_datasets(cfg.data, load_tokenizer(cfg.model))[0][i] for i in range(4)]
    grad_fn = make_loss_and_grad(qlora.model)  # compiled, as in training
    g2, loss2, n2 = step_gradients(
        grad_fn, qlora.model, [to_batch(rows[:2], 0), to_batch(rows[2:], 0)]
    )
    g1, loss1, n1 = step_gradients(grad_fn, qlora.model, [to_batch(rows, 0)])
    assert n1 == n2 and abs(loss1.item() - loss2.item()) < 1e-5
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        diff = np.abs(np.array(a) - np.array(b))
        assert diff.max() < 1e-6 + 1e-4 * np.abs(np.array(a)).max(), (name, diff.max())


def test_compiled_gradients_equal_eager(qlora, shared_data):
    from mlx.utils import tree_flatten

    from turbotune.backends.mlx.data import to_batch
    from turbotune.data import build_datasets
    from turbotune.modeling import load_tokenizer

    cfg = load_config({"backend": "mlx"}, run_overrides(shared_data, Path("unused"), "nf4"))
    batch = to_batch(
        [build_datasets(cfg.data, load_tokenizer(cfg.model))[0][i] for i in range(3)], 0
    )
    eager = make_loss_and_grad(qlora.model, compiled=False)
    compiled = make_loss_and_grad(qlora.model)
    (l1, g1), (l2, g2) = (f(qlora.model, batch.inputs, batch.targets) for f in (eager, compiled))
    assert abs(l1.item() - l2.item()) < 1e-4 * abs(l1.item()), (l1.item(), l2.item())
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        diff = np.abs(np.array(a) - np.array(b))
        assert diff.max() < 1e-6 + 1e-4 * np.abs(np.array(a)).max(), (name, diff.max(), diff.mean())


def test_batches_keep_response_only_labels(shared_data, stories260k):
    """Prompt tokens carry no loss (alpaca: response only), padding none either."""
    from turbotune.backends.mlx.data import to_batch
    from turbotune.data import build_datasets
    from turbotune.modeling import load_tokenizer

    cfg = load_config({"backend": "mlx"}, run_overrides(shared_data, Path("unused"), "none"))
    train, _ = build_datasets(cfg.data, load_tokenizer(cfg.model))
    rows = [train[i] for i in range(3)]
    batch = to_batch(rows, 0)
    targets = np.array(batch.targets)
    for i, row in enumerate(rows):
        labels = np.array(row["labels"])
        np.testing.assert_array_equal(targets[i, : len(labels) - 1], labels[1:])
        assert (targets[i, len(labels) - 1 :] == -100).all()
        assert (labels[1:] == -100).any() and (labels[1:] != -100).any()
    assert batch.target_tokens == sum(int((np.array(r["labels"][1:]) != -100).sum()) for r in rows)
