"""Gradient accumulation is one big batch: the loss of an optimizer step is the mean over ALL its
target tokens, not the mean of per-micro-batch means (the Hugging Face bug fixed in 4.46).

Eight rows whose targets have very different lengths are trained as 8 x 1, 2 x 4 and 1 x 8
(micro-batch x accumulation). With exactly 8 rows every optimizer step sees all of them, whatever
the shuffle, so the three runs must log the same losses and end with the same weights. Plain SGD
without clipping makes the update proportional to the gradient (Adam's first steps and clipping
would hide a scale error). The 1 x 8 run is the sharp one: under the bug its loss would be the
mean of the per-row mean losses, which the test computes and shows to be far from the right value.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from turbotune.train.run import run_training

from .conftest import step_losses, stories_config

pytestmark = pytest.mark.usefixtures("single_thread")

#: Targets from 1 to ~40 tokens, so per-row means weigh tokens very unequally.
ROWS = [
    ("Name a colour.", "Red."),
    ("Say yes.", "Yes."),
    ("Tell a short story.", "Once upon a time there was a little dog who liked to run in the park "
     "with his friend the cat, and every day they played until the sun went down."),
    ("What is the cat doing?", "The cat is sleeping."),
    ("Describe the sky.", "The sky was big and blue, with soft white clouds."),
    ("Who is Tom?", "Tom is a boy who lives in a small house near the woods with his mom, his "
     "dad and a happy little bird."),
    ("Count to three.", "One, two, three."),
    ("Say hi.", "Hi!"),
]  # fmt: skip
STEPS, LR, TOL = 2, 0.5, 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("accum") / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in ROWS))
    return path


def _run(stories260k, data, out, batch: int, accum: int):
    cfg = stories_config(
        stories260k, data, out, max_steps=STEPS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, optimizer="sgd", learning_rate=LR, max_grad_norm=0.0,
        lr_scheduler="constant", warmup_steps=0,
    )  # fmt: skip
    cfg["data"].update(max_length=256, max_samples=None)  # nothing truncated
    result = run_training(cfg)
    weights = load_file(str(result.output_dir / "adapter_model.safetensors"))
    return step_losses(result.trainer.state.log_history), weights, result


def _per_token_losses(result) -> list[torch.Tensor]:
    """Each row's per-target-token loss under the untrained model (LoRA B = 0: the base)."""
    ds = result.trainer.train_dataset
    model = result.trainer.model
    out = []
    with torch.no_grad(), model.disable_adapter():
        for row in ds:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            out.append(
                torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
            )
    return out


def test_accumulation_equals_one_big_batch(stories260k, data, tmp_path):
    runs = {
        (b, a): _run(stories260k, data, tmp_path / f"b{b}a{a}", b, a)
        for b, a in [(8, 1), (2, 4), (1, 8)]
    }
    ref_losses, ref_weights, ref = runs[(8, 1)]
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    per_row = _per_token_losses(ref)
    n_targets = [len(t) for t in per_row]
    assert max(n_targets) >= 10 * min(n_targets), n_targets
    token_mean = torch.cat(per_row).mean().item()
    mean_of_row_means = torch.stack([t.mean() for t in per_row]).mean().item()
    # Step 1 runs the untrained model: its loss is the token mean over all 8 rows.
    assert ref_losses[1] == pytest.approx(token_mean, abs=TOL), (ref_losses[1], token_mean)
    assert abs(mean_of_row_means - token_mean) > 100 * TOL, "the data cannot reveal the bug"

    for key, (losses, weights, _) in runs.items():
        if key == (8, 1):
            continue
        label = f"batch {key[0]} x accumulation {key[1]}"
        diffs = {s: abs(losses[s] - ref_losses[s]) for s in ref_losses}
        assert max(diffs.values()) < TOL, (
            f"{label}: losses {losses} vs {ref_losses} (diffs {diffs})"
        )
        assert weights.keys() == ref_weights.keys()
        worst = max(weights, key=lambda k: (weights[k] - ref_weights[k]).abs().max().item())
        diff = (weights[worst] - ref_weights[worst]).abs()
        assert diff.max() < TOL, (
            f"{label}: {worst} max abs diff {diff.max():.2e} mean {diff.mean():.2e}"
        )
    # The updates compared are real: SGD moved every adapter matrix (B from 0, then A).
    for name, w in ref_weights.items():
        if "lora_B" in name:
            assert w.abs().max() > 1e-3, f"{name} barely trained: {w.abs().max():.2e}"
