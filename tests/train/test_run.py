"""``run_training`` and ``turbotune train``: real model, real data, every precision, schedule,
checkpointing variant and train type, and the errors a user meets first.

Runs use the real pretrained TinyStories Llama (260K parameters) and a few rows of Alpaca, a
couple of optimizer steps each: what is checked is the wiring (the right dtypes, the schedule the
Trainer really applied, gradients reaching the adapters), not convergence, except in the one
test that asks for a lower eval loss.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from turbotune.config import load_config
from turbotune.errors import ConfigError, TurbotuneError
from turbotune.train.run import run_training
from turbotune.train.schedules import lr_multiplier, resolve_warmup_steps

from .conftest import REPO, check_ok, read_metrics, run_clis, step_losses, stories_config

pytestmark = pytest.mark.usefixtures("single_thread")

# --- the real path: LoRA on a pretrained model lowers the held-out loss --------------------------


def test_lora_lowers_eval_loss(trained_lora):
    trainer = trained_lora.trainer
    assert len(trainer.eval_dataset) == 10, "eval_ratio 0.1 of 100 rows"
    trained = trained_lora.eval_metrics["eval_loss"]
    with trainer.model.disable_adapter():
        base = trainer.evaluate()["eval_loss"]
    assert trained < base - 0.3, f"eval loss {base:.4f} (base) -> {trained:.4f} (LoRA)"
    losses = step_losses(trainer.state.log_history)
    assert sorted(losses) == [4, 8, 12], losses
    # The metrics log on disk holds the same training losses the Trainer kept in memory.
    assert step_losses(read_metrics(trained_lora.output_dir.parent)) == losses
    assert (trained_lora.output_dir / "adapter_model.safetensors").is_file()
    assert not (trained_lora.output_dir.parent / ".staging").exists()


def test_train_through_cli(tmp_path):
    """The sample config from the repo root (its paths are relative to it), and the demo."""
    if not (REPO / "../shared/data/stories260K/hf").is_dir():
        pytest.skip("the sample config expects the checkout next to ../shared (see its header)")
    lora, demo = tmp_path / "lora", tmp_path / "demo"
    lora_run, demo_run = run_clis(
        ("train", "stories260k-lora", "train.max_steps=2", "train.logging_steps=1",
         f"train.output_dir={lora}"),
        ("train", "train.max_steps=3", f"train.output_dir={demo}"),
    )  # fmt: skip
    check_ok(lora_run)
    adapter = json.loads((lora / "final" / "adapter_config.json").read_text())
    base = Path(adapter["base_model_name_or_path"])  # usable from any directory (merge, generate)
    assert base.is_absolute() and base == (REPO / "../shared/data/stories260K/hf").resolve()
    saved = load_config(lora / "final" / "turbotune.yaml")
    assert saved.data.path == "../shared/data/alpaca/alpaca_tiny.json"
    assert re.search(r"eval loss \d+\.\d{4}", lora_run.stderr), lora_run.stderr[-2000:]
    assert [m["step"] for m in read_metrics(lora) if "loss" in m] == [1, 2]

    check_ok(demo_run)
    assert re.search(r"demo held-out accuracy: \d+\.\d% -> \d+\.\d%", demo_run.stderr)
    assert (demo / "final" / "model.safetensors").is_file()


# --- precision modes ---------------------------------------------------------------------------


def _dtypes(model) -> dict[str, torch.dtype]:
    params = dict(model.named_parameters())
    base = next(p for n, p in params.items() if "q_proj.base_layer.weight" in n)
    lora = next(p for n, p in params.items() if "lora_A" in n)
    inv_freq = next(b for n, b in model.named_buffers() if "inv_freq" in n)
    return {"base": base.dtype, "lora": lora.dtype, "inv_freq": inv_freq.dtype}


@pytest.mark.parametrize(
    ("mode", "base", "autocast"),
    [
        ("fp32", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("bf16_autocast", torch.float32, True),
        ("bf16_buffers_autocast", torch.bfloat16, True),
    ],
)
def test_precision_modes_train_on_cpu(stories260k, alpaca_tiny, tmp_path, mode, base, autocast):
    cfg = stories_config(
        stories260k, alpaca_tiny, tmp_path, precision=mode, per_device_train_batch_size=2
    )
    result = run_training(cfg)
    model = result.trainer.model
    assert _dtypes(model) == {"base": base, "lora": torch.float32, "inv_freq": torch.float32}
    assert result.trainer.args.bf16 is autocast
    losses = step_losses(result.trainer.state.log_history)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values()), losses
    moved = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
    assert moved > 0, f"{mode}: the adapters did not train (lora_B still zero)"


def test_fp16_autocast_on_cpu_is_a_clear_error(stories260k, alpaca_tiny, tmp_path):
    cfg = stories_config(stories260k, alpaca_tiny, tmp_path, precision="fp16_autocast")
    with pytest.raises(ConfigError, match=r"fp16_autocast.*accelerator"):
        run_training(cfg)


# --- schedules run through the Trainer ---------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    ["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "exponential"],
)
def test_trainer_applies_the_schedule(stories260k, alpaca_tiny, tmp_path, schedule):
    steps, peak = 4, 1e-3
    cfg = stories_config(
        stories260k, alpaca_tiny, tmp_path, max_steps=steps, lr_scheduler=schedule,
        warmup_steps=1, learning_rate=peak, lr_gamma=0.5, lr_num_cycles=2.0, min_lr_ratio=0.1,
        per_device_train_batch_size=1,
    )  # fmt: skip
    cfg["data"].update(max_samples=8, max_length=32)
    result = run_training(cfg)
    logged = [h["learning_rate"] for h in result.trainer.state.log_history if "loss" in h]
    train = load_config(cfg).train
    f = lr_multiplier(train, steps, resolve_warmup_steps(train, steps, 8))
    # The Trainer logs the rate each update used: update s (from 1) used f(s - 1).
    expected = [peak * f(s) for s in range(steps)]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12), (
        f"{schedule}: {logged} != {expected}"
    )


# --- gradient checkpointing, train types -------------------------------------------------------


def test_gradient_checkpointing_trains_like_no_checkpointing(stories260k, alpaca_tiny, tmp_path):
    """Same losses with and without recomputation; step 2 and 3 only match if the adapters got
    their gradients through the checkpointed blocks (frozen embeddings give the reentrant variant
    inputs without grad)."""
    runs = {}
    for name, over in {
        "off": [],
        "non-reentrant": ["train.gradient_checkpointing=true"],
        "reentrant": ["train.gradient_checkpointing=true", "train.reentrant_checkpointing=true"],
    }.items():
        cfg = stories_config(stories260k, alpaca_tiny, tmp_path / name, max_steps=3)
        result = run_training(cfg, over)
        enabled = any(
            getattr(m, "gradient_checkpointing", False) for m in result.trainer.model.modules()
        )
        assert enabled == (name != "off"), name
        runs[name] = step_losses(result.trainer.state.log_history)
    for name in ("non-reentrant", "reentrant"):
        got, want = runs[name], runs["off"]
        diff = max(abs(got[s] - want[s]) for s in want)
        assert got.keys() == want.keys() and diff < 1e-5, (
            f"{name}: {got} vs {want} (max diff {diff:.2e})"
        )


def test_train_type_full_trains_every_weight(stories260k, alpaca_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = stories_config(stories260k, alpaca_tiny, tmp_path, learning_rate=1e-3)
    del cfg["adapter"]
    cfg["train_type"] = "full"
    result = run_training(cfg)
    model = result.trainer.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in model.parameters())
    base = AutoModelForCausalLM.from_pretrained(stories260k)
    moved = (
        (model.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight)
        .abs()
        .max()
    )
    assert moved > 1e-4, f"full fine-tuning left the weights unchanged (max change {moved:.2e})"
    # The final directory is a plain Hugging Face model with the same outputs.
    final = result.output_dir
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = model.eval()(ids).logits, loaded(ids).logits
    diff = (got - want).abs()
    assert diff.max() < 1e-5, (
        f"reloaded model logits differ: max {diff.max():.2e} mean {diff.mean():.2e}"
    )


def test_train_type_lora_trains_adapters_only(stories260k, alpaca_tiny, tmp_path):
    cfg = stories_config(stories260k, alpaca_tiny, tmp_path, max_steps=1)
    del cfg["adapter"]
    cfg["train_type"] = "lora"
    result = run_training(cfg)
    trainable = {n for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16  # the adapter section's default


# --- errors a user meets first -----------------------------------------------------------------


def test_hf_precision_flag_names_the_turbotune_key(stories260k, alpaca_tiny, tmp_path):
    cfg = stories_config(stories260k, alpaca_tiny, tmp_path)
    with pytest.raises(ConfigError, match=r"set 'train\.precision' instead of 'train\.bf16'"):
        run_training(cfg, ["train.bf16=true"])
    with pytest.raises(
        ConfigError, match=r"'train\.lr_scheduler' instead of 'train\.lr_scheduler_type'"
    ):
        run_training(cfg, ["train.lr_scheduler_type=linear"])


def test_missing_data_file_is_named(stories260k, tmp_path):
    missing = tmp_path / "nowhere" / "rows.json"
    cfg = stories_config(stories260k, missing, tmp_path / "out")
    with pytest.raises(TurbotuneError, match=re.escape(str(missing))):
        run_training(cfg)


@pytest.mark.parametrize("missing", [{"output": "  "}, {}], ids=["blank", "absent"])
def test_row_without_target_is_named(stories260k, tmp_path, missing):
    rows = [
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Say bye.", **missing},
    ]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    cfg = stories_config(stories260k, data, tmp_path / "out")
    with pytest.raises(TurbotuneError, match=r"rows\.json.*row 1.*'output' is empty"):
        run_training(cfg)
    assert not (tmp_path / "out").exists(), (
        "a data error must stop the run before it writes anything"
    )


def test_resume_latest_without_checkpoint_is_a_clear_error(stories260k, alpaca_tiny, tmp_path):
    cfg = stories_config(stories260k, alpaca_tiny, tmp_path / "empty")
    with pytest.raises(TurbotuneError, match=r"resume_from_checkpoint=latest.*no checkpoint-N"):
        run_training(cfg, ["train.resume_from_checkpoint=latest"])
    with pytest.raises(TurbotuneError, match=r"checkpoint '.*nope' does not exist"):
        run_training(cfg, [f"train.resume_from_checkpoint={tmp_path / 'nope'}"])


# --- the built-in demo (a smoke test: another file proves it learns) ---------------------------


def test_demo_smoke(tmp_path, capsys):
    result = run_training(None, ["train.max_steps=5", f"train.output_dir={tmp_path}"])
    before, after = result.demo_accuracy
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    err = capsys.readouterr().err
    assert re.search(r"demo held-out accuracy: \d+\.\d% -> \d+\.\d%", err), err[-2000:]
    assert result.trainer.state.global_step == 5
    assert (result.output_dir / "model.safetensors").is_file()
