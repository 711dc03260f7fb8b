"""``turbotune train`` with ``padding_free`` + ``multipack`` on the real stories260K model.

What is proven: the Trainer really gets the padding-free collator, the packed attention and the
multipack dataloader; LoRA training through them lowers the held-out loss; and a run stopped
mid-way through its SECOND epoch and resumed from its checkpoint logs the same losses as a run
that never stopped, with gradient accumulation (the sampler's epoch reaches it and the skipped
micro-batches are the trained ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from turbotune.train.run import run_training


def config(model: Path, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 96, "max_samples": 40},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "precision": "fp32", "per_device_train_batch_size": 4, "learning_rate": 3e-3,
            "logging_steps": 1, "output_dir": str(out), "report_to": [], "lr_scheduler": "constant",
            **train,
        },
        "plugins": {"padding_free": {}, "multipack": {"max_tokens": 384}},
    }  # fmt: skip


def step_losses(log_history: list[dict[str, Any]]) -> dict[int, float]:
    return {int(h["step"]): float(h["loss"]) for h in log_history if "loss" in h}


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.usefixtures("single_thread")
def test_padding_free_multipack_training_lowers_the_eval_loss(stories260k, alpaca_tiny, tmp_path):
    from turbotune.data.multipack import MultipackBatchSampler
    from turbotune.data.padding_free import PaddingFreeCollator

    cfg = config(stories260k, alpaca_tiny, tmp_path / "run", max_steps=16)
    cfg["data"]["eval_ratio"] = 0.2
    result = run_training(cfg)
    trainer = result.trainer
    assert isinstance(trainer.data_collator, PaddingFreeCollator)
    assert trainer.model.get_base_model().config._attn_implementation == "turbotune_varlen"
    sampler = trainer.train_batch_sampler()
    assert isinstance(sampler, MultipackBatchSampler)
    assert len(trainer.get_train_dataloader()) == len(sampler)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
    assert batch["input_ids"].shape[1] <= 384
    trained = result.eval_metrics["eval_loss"]
    with trainer.model.disable_adapter():
        base = trainer.evaluate()["eval_loss"]
    assert trained < base - 0.3, f"eval loss {base:.4f} (base) -> {trained:.4f} (LoRA)"


@pytest.mark.usefixtures("single_thread")
def test_resume_in_the_second_epoch_repeats_the_same_losses(stories260k, alpaca_tiny, tmp_path):
    """With gradient accumulation: the Trainer skips 2 micro-batches per optimizer step."""

    def run(out: Path, **train: Any):
        callbacks = [StopAfter(train.pop("stop"))] if "stop" in train else []
        cfg = config(
            stories260k, alpaca_tiny, out, num_train_epochs=2, gradient_accumulation_steps=2,
            **train,
        )  # fmt: skip
        return run_training(cfg, callbacks=callbacks).trainer

    full = run(tmp_path / "full")
    per_epoch = -(-len(full.get_train_dataloader()) // 2)  # optimizer steps per epoch
    total = full.state.global_step
    assert total == 2 * per_epoch and per_epoch >= 3, (per_epoch, total)
    stop = per_epoch + 1  # inside the second epoch, whose batches differ from the first's
    run(tmp_path / "cut", stop=stop, save_steps=stop)
    checkpoint = tmp_path / "cut" / f"checkpoint-{stop}"
    assert checkpoint.is_dir()
    resumed = run(tmp_path / "cut", resume_from_checkpoint=str(checkpoint))
    want = {s: v for s, v in step_losses(full.state.log_history).items() if s > stop}
    got = {s: v for s, v in step_losses(resumed.state.log_history).items() if s > stop}
    assert got.keys() == want.keys() and want
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) < 1e-6, f"resumed {got} vs uninterrupted {want}"


@pytest.mark.usefixtures("single_thread")
def test_composes_with_nf4_and_fused_ops(stories260k, alpaca_tiny, tmp_path, monkeypatch):
    """QLoRA (bitsandbytes NF4 on CPU) + fused ops + padding_free logs the losses of the same run
    padded: the same rows per step (the Trainer's sampler), the same targets, the same mean.
    The fused ops take their eager references here (TRITON_INTERPRET=0): this checks the wiring;
    the kernels have their own tests."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def losses(out: Path, plugins: dict[str, Any]) -> dict[int, float]:
        cfg = config(stories260k, alpaca_tiny, out, max_steps=3)
        cfg["data"]["max_samples"] = 24
        cfg["quantization"] = {"method": "nf4", "compute_dtype": "float32"}
        cfg["plugins"] = plugins
        trainer = run_training(cfg).trainer
        return step_losses(trainer.state.log_history)

    padded = losses(tmp_path / "padded", {"fused_ops": {}})
    packed = losses(tmp_path / "packed", {"fused_ops": {}, "padding_free": {}})
    assert padded.keys() == packed.keys() == {1, 2, 3}
    diffs = {s: abs(padded[s] - packed[s]) for s in padded}
    assert max(diffs.values()) < 1e-4, f"padded {padded} vs padding-free {packed}"
