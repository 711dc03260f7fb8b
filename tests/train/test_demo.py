"""The built-in demo: its pieces are well formed, and a plain Trainer teaches the task.

The training test is the proof the demo is worth shipping: with ``demo_config()['train']`` and a
plain ``transformers.Trainer``, held-out exact match goes from ~0% to over 90% on 2 CPU cores in
well under a minute (98-100% over 9 seeds while tuning; 0.9 leaves room for another machine's
floating-point path).
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from turbotune.config import load_config
from turbotune.train.demo import (
    DEMO_EVAL_EXAMPLES,
    DEMO_TRAIN_EXAMPLES,
    build_demo_model,
    build_demo_tokenizer,
    demo_accuracy,
    demo_config,
    demo_dataset,
    demo_examples,
    demo_readable,
    greedy_generate,
)
from turbotune.train.demo_task import DEMO_DIGITS


def test_tokenizer_round_trips_and_saves(tmp_path):
    tok = build_demo_tokenizer(save_dir=tmp_path)
    ids = tok("042+317=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 9
    assert tok.decode(ids, skip_special_tokens=True) == "042+317="
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<bos>", "<eos>"}
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("042+317=")["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_examples_are_correct_and_splits_disjoint():
    train = demo_examples(20_000, seed=0)
    held_out = demo_examples(DEMO_EVAL_EXAMPLES, seed=1, split="eval", distinct=True)
    for ex in train[:300] + held_out[:300]:
        a, b = ex["prompt"].rstrip("=").split("+")
        assert len(a) == len(b) == DEMO_DIGITS and len(ex["completion"]) == DEMO_DIGITS + 1
        # Little-endian: reverse every number to read it.
        assert int(ex["completion"][::-1]) == int(a[::-1]) + int(b[::-1]), ex
    assert demo_readable({"prompt": "24+71=", "completion": "950"}) == "42+17=59"
    train_prompts = {ex["prompt"] for ex in train}
    # 20,000 draws with replacement from 9,000 pairs hit ~8,000 distinct ones.
    assert len(train_prompts) > 7_500, f"only {len(train_prompts)} distinct train prompts"
    overlap = train_prompts & {ex["prompt"] for ex in held_out}
    assert not overlap, f"{len(overlap)} eval prompts also in train, e.g. {sorted(overlap)[:3]}"
    assert len({ex["prompt"] for ex in held_out}) == DEMO_EVAL_EXAMPLES
    assert demo_examples(5, seed=3) == demo_examples(5, seed=3)
    assert demo_examples(5, seed=3) != demo_examples(5, seed=4)


def test_dataset_puts_loss_on_completion_and_eos_only():
    tok = build_demo_tokenizer()
    ds = demo_dataset(tok, 8, seed=0)
    assert set(ds.column_names) == {"input_ids", "labels"}
    ex = demo_examples(8, seed=0)[0]
    row = ds[0]
    n_prompt = 1 + len(ex["prompt"])  # <bos> + characters
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["labels"][-1] == tok.eos_token_id
    assert tok.decode(row["labels"][n_prompt:-1]) == ex["completion"]


def test_model_is_seeded_and_config_loads():
    tok = build_demo_tokenizer()
    a, b = build_demo_model(tok), build_demo_model(tok)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs between two builds with the same seed"
    cfg = load_config(demo_config())
    assert cfg.adapter.method == "full" and cfg.model.path is None and cfg.train.max_steps > 0


def test_greedy_generate_left_padding_matches_unpadded():
    tok = build_demo_tokenizer()
    model = build_demo_model(tok).eval()
    prompts = ["1+2=", "42+17=", "99+5=", "7+"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5)
    alone = [greedy_generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone


def _training_args(train: dict, output_dir: str) -> TrainingArguments:
    """The demo's ``train`` section in plain ``TrainingArguments`` names (no turbotune engine)."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=train["max_steps"],
        per_device_train_batch_size=train["per_device_train_batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=train["warmup_steps"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        seed=train["seed"],
        logging_steps=train["logging_steps"],
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


@pytest.mark.slow
def test_demo_training_learns_the_task(tmp_path):
    start = time.perf_counter()
    tok = build_demo_tokenizer()
    model = build_demo_model(tok)
    train = demo_config()["train"]
    held_out = demo_examples(DEMO_EVAL_EXAMPLES, seed=1, split="eval", distinct=True)
    before = demo_accuracy(model, tok, held_out)

    trainer = Trainer(
        model=model,
        args=_training_args(train, str(tmp_path)),
        train_dataset=demo_dataset(tok, DEMO_TRAIN_EXAMPLES, seed=0),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    after = demo_accuracy(model, tok, held_out)
    elapsed = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"demo: accuracy {before:.1%} -> {after:.1%} in {elapsed:.1f}s; losses {losses}")
    assert before < 0.05, f"untrained accuracy {before:.1%} should be near 0"
    assert after > 0.9, f"trained accuracy {after:.1%} (before {before:.1%}); losses {losses}"
