"""Checkpoints that resume exactly: an interrupted run, resumed, logs the same losses as a run
that was never stopped, with adapter dropout on (so the restored RNG state matters too).

The runs share one cosine schedule over 4 steps, a checkpoint every 2: the uninterrupted run goes
to step 4; the interrupted one is stopped by a callback after step 2 (what a killed job leaves
behind is its newest checkpoint); the resumed runs pick up there, through ``latest`` and through
an explicit path. A control resumed without the RNG state shows the dropout makes the comparison
sharp: it must NOT match.
"""

from __future__ import annotations

import shutil

import pytest
from transformers import TrainerCallback

from turbotune.train.checkpoint import STAGING, checkpoints
from turbotune.train.run import run_training

from .conftest import read_metrics, step_losses, stories_config

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, SAVE_EVERY = 4, 2
CHECKPOINT_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}


class StopAfter(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as if the job had been killed there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _config(stories260k, alpaca_tiny, out):
    return stories_config(
        stories260k, alpaca_tiny, out, adapter={"dropout": 0.2, "alpha": 64}, max_steps=STEPS,
        save_steps=SAVE_EVERY, per_device_train_batch_size=2, lr_scheduler="cosine", warmup_steps=0,
    )  # fmt: skip


def _assert_same(got: dict[int, float], want: dict[int, float], label: str) -> None:
    diffs = {s: abs(got[s] - want[s]) for s in want if s in got}
    assert got.keys() == want.keys(), f"{label}: logged steps {sorted(got)} != {sorted(want)}"
    assert max(diffs.values()) < 1e-6, f"{label}: {got} vs {want}; abs diffs {diffs}"


@pytest.fixture(scope="module")
def runs(stories260k, alpaca_tiny, tmp_path_factory):
    """The uninterrupted run and the interrupted one (stopped after step 2)."""
    from .conftest import one_thread

    root = tmp_path_factory.mktemp("resume")
    with one_thread():
        full = run_training(_config(stories260k, alpaca_tiny, root / "full"))
        cut = run_training(
            _config(stories260k, alpaca_tiny, root / "cut"), callbacks=[StopAfter(SAVE_EVERY)]
        )
    return root, full, cut


def test_interrupted_run_left_a_complete_checkpoint(runs):
    root, full, cut = runs
    assert cut.trainer.state.global_step == SAVE_EVERY
    assert [p.name for p in checkpoints(root / "cut")] == [f"checkpoint-{SAVE_EVERY}"]
    assert [p.name for p in checkpoints(root / "full")] == ["checkpoint-2", "checkpoint-4"]
    for ckpt in checkpoints(root / "cut") + checkpoints(root / "full"):
        missing = CHECKPOINT_FILES - {p.name for p in ckpt.iterdir()}
        assert not missing, f"{ckpt} lacks {sorted(missing)}"
    leftovers = sorted(str(p) for p in root.rglob(f"*{STAGING}*"))
    assert not leftovers, f"staging directories left behind: {leftovers}"
    assert step_losses(cut.trainer.state.log_history) == {
        s: v for s, v in step_losses(full.trainer.state.log_history).items() if s <= SAVE_EVERY
    }


def test_resume_latest_matches_the_uninterrupted_run(runs, stories260k, alpaca_tiny):
    root, full, _ = runs
    resumed = run_training(
        _config(stories260k, alpaca_tiny, root / "cut"), ["train.resume_from_checkpoint=latest"]
    )
    want = {s: v for s, v in step_losses(full.trainer.state.log_history).items() if s > SAVE_EVERY}
    got = {
        s: v for s, v in step_losses(resumed.trainer.state.log_history).items() if s > SAVE_EVERY
    }
    _assert_same(got, want, "resume latest")
    # The metrics log on disk continues: the first run's steps, then the resumed ones.
    on_disk = [m["step"] for m in read_metrics(root / "cut") if "loss" in m]
    assert on_disk == [1, 2, 3, 4], on_disk
    assert [p.name for p in checkpoints(root / "cut")] == ["checkpoint-2", "checkpoint-4"]


def test_resume_from_an_explicit_checkpoint(runs, stories260k, alpaca_tiny):
    root, full, _ = runs
    ckpt = root / "full" / f"checkpoint-{SAVE_EVERY}"
    resumed = run_training(
        _config(stories260k, alpaca_tiny, root / "explicit"),
        [f"train.resume_from_checkpoint={ckpt}"],
    )
    want = {s: v for s, v in step_losses(full.trainer.state.log_history).items() if s > SAVE_EVERY}
    got = {
        s: v for s, v in step_losses(resumed.trainer.state.log_history).items() if s > SAVE_EVERY
    }
    _assert_same(got, want, "resume from a path")


def test_without_the_rng_state_the_losses_differ(runs, stories260k, alpaca_tiny):
    """The control: dropout masks drawn from a fresh RNG change the resumed losses."""
    root, full, _ = runs
    ckpt = root / "no-rng" / f"checkpoint-{SAVE_EVERY}"
    shutil.copytree(root / "full" / f"checkpoint-{SAVE_EVERY}", ckpt)
    (ckpt / "rng_state.pth").unlink()
    resumed = run_training(
        _config(stories260k, alpaca_tiny, root / "no-rng"), ["train.resume_from_checkpoint=latest"]
    )
    want = step_losses(full.trainer.state.log_history)
    got = step_losses(resumed.trainer.state.log_history)
    step = SAVE_EVERY + 1
    assert abs(got[step] - want[step]) > 1e-4, (
        f"step {step} loss {got[step]} equals the uninterrupted {want[step]} without the RNG state: "
        "dropout does not make the resume test sensitive to RNG restoration"
    )


def test_custom_lora_resumes_exactly(stories260k, alpaca_tiny, tmp_path):
    """turbotune's own LoRA layers (not a PeftModel) checkpoint and resume like peft's."""
    from .conftest import one_thread

    def config(out):
        cfg = _config(stories260k, alpaca_tiny, out)
        cfg["adapter"]["implementation"] = "custom"
        return cfg

    with one_thread():
        full = run_training(config(tmp_path / "full"))
        run_training(config(tmp_path / "cut"), callbacks=[StopAfter(SAVE_EVERY)])
        resumed = run_training(config(tmp_path / "cut"), ["train.resume_from_checkpoint=latest"])
    want = {s: v for s, v in step_losses(full.trainer.state.log_history).items() if s > SAVE_EVERY}
    got = {
        s: v for s, v in step_losses(resumed.trainer.state.log_history).items() if s > SAVE_EVERY
    }
    _assert_same(got, want, "custom LoRA resume")


def test_llama_pro_on_a_4bit_base_resumes_exactly(stories260k, alpaca_tiny, tmp_path):
    """``bnb_llama_pro``: 4-bit old blocks, dense new ones; the checkpoint holds the whole model,
    and resuming reads back only the new blocks (a full state-dict load cannot: 4-bit)."""
    pytest.importorskip("bitsandbytes")
    from turbotune.expand import expand_checkpoint

    from .conftest import one_thread

    pro = tmp_path / "pro"
    expand_checkpoint(stories260k, pro, new_blocks=1, progress=False)

    def config(out):
        cfg = _config(pro, alpaca_tiny, out)
        cfg.pop("adapter", None)
        cfg["train_type"] = "bnb_llama_pro"
        cfg["train"]["learning_rate"] = 1e-2
        return cfg

    with one_thread():
        full = run_training(config(tmp_path / "full"))
        run_training(config(tmp_path / "cut"), callbacks=[StopAfter(SAVE_EVERY)])
        resumed = run_training(config(tmp_path / "cut"), ["train.resume_from_checkpoint=latest"])
    want = {s: v for s, v in step_losses(full.trainer.state.log_history).items() if s > SAVE_EVERY}
    got = {
        s: v for s, v in step_losses(resumed.trainer.state.log_history).items() if s > SAVE_EVERY
    }
    _assert_same(got, want, "Llama-Pro (4-bit old blocks) resume")
