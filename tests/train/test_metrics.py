"""The metrics callback: token accounting, FLOPs and MFU, excluded eval/save time, the JSON
lines file and the console line, driven by a real tiny Trainer."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from turbotune.train.flops import train_flops_per_token
from turbotune.train.metrics import METRICS_FILE, MetricsCallback, count_tokens, format_log

PAD = 0


def _padded_batch() -> dict[str, torch.Tensor]:
    # Row 0: 5 tokens, the first 2 a prompt without loss; row 1: 3 tokens, then padding.
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [3, 4, 5, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_count_tokens_padded() -> None:
    n_in, n_tgt, context2 = count_tokens(_padded_batch())
    assert int(n_in) == 8
    # labels shift by one inside the model: row 0 predicts 7, 8, 9; row 1 predicts 4, 5.
    assert int(n_tgt) == 5
    assert int(context2) == 5**2 + 3**2  # sum over rows of L^2: L/2 keys per token, twice


def test_count_tokens_padding_free() -> None:
    # Three sequences of 4, 2 and 3 tokens packed in one row; positions restart at 0.
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    labels = torch.tensor([[-100, 1, 1, 1, -100, 1, -100, 1, 1]])
    batch = {"input_ids": torch.ones(1, 9, dtype=torch.long), "position_ids": pos, "labels": labels}
    n_in, n_tgt, context2 = count_tokens(batch)
    assert (int(n_in), int(n_tgt), int(context2)) == (9, 6, 16 + 4 + 9)
    no_positions = {"input_ids": torch.ones(2, 6, dtype=torch.long)}
    n_in, n_tgt, context2 = count_tokens(no_positions)
    assert (n_in, n_tgt, context2) == (12, None, 2 * 36)


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def _log_at(cb: MetricsCallback, args, state: TrainerState, step: int) -> dict[str, float]:
    state.global_step = step
    logs = {"loss": 1.0, "learning_rate": 1e-4, "grad_norm": 0.5}
    cb.on_log(args, state, TrainerControl(), logs=logs)
    return logs


def test_window_accounting_with_tensors_and_ints(tmp_path) -> None:
    args = _args(tmp_path)
    state = TrainerState()
    cb = MetricsCallback(flops_per_token=1000.0, attention_flops=10.0, seq_len=8, peak_flops=1e6)
    cb.on_train_begin(args, state, TrainerControl())
    cb.observe_batch(_padded_batch())  # 8 input, 5 target, context2 34
    cb.observe_batch(torch.tensor(4), torch.tensor(3))  # bare counts: context2 = 4 * 8
    cb.observe_batch(6, 2, flops=5e4)  # explicit FLOPs replace the estimate
    logs = _log_at(cb, args, state, step=2)
    seconds = logs["step_time_s"] * 2
    n_tgt = logs["tokens_per_s"] * seconds
    n_in = logs["input_tokens_per_s"] * seconds
    flops = logs["mfu"] * 1e6 * seconds
    want_flops = (1000 * 8 + 10 * 0.5 * 34) + (1000 * 4 + 10 * 0.5 * 32) + 5e4
    for got, want, what in (
        (n_tgt, 10, "target"),
        (n_in, 18, "input"),
        (flops, want_flops, "flops"),
    ):
        assert got == pytest.approx(want, rel=1e-9), f"{what}: {got} vs {want}"
    assert logs["peak_mem_gib"] > 0 and logs["loss"] == 1.0
    # The next window starts empty: no batches, no token rates, no MFU.
    logs = _log_at(cb, args, state, step=4)
    assert "tokens_per_s" not in logs and "mfu" not in logs and "step_time_s" in logs


@pytest.mark.parametrize("recompute", [False, True])
def test_for_model_counts_lora_and_recompute(tmp_path, recompute: bool) -> None:
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    args = _args(tmp_path, gradient_checkpointing=True)
    cb = MetricsCallback.for_model(
        model, args, seq_len=8, count_recompute=recompute, peak_flops=1e6
    )
    state = TrainerState()
    cb.on_train_begin(args, state, TrainerControl())
    cb.observe_batch({"input_ids": torch.ones(1, 10, dtype=torch.long)})  # one row of 10
    logs = _log_at(cb, args, state, step=1)
    flops = logs["mfu"] * 1e6 * logs["step_time_s"]
    lora = 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    want = 10 * train_flops_per_token(
        config, 10, trainable="lora", lora_params=lora, checkpointing=recompute
    )
    assert flops == pytest.approx(want, rel=1e-9), f"FLOPs {flops} vs {want}"


def test_unknown_flops_or_peak_omit_mfu(tmp_path) -> None:
    args = _args(tmp_path)
    for cb in (MetricsCallback(None, peak_flops=1e12), MetricsCallback(1e3, peak_flops=None)):
        state = TrainerState()
        cb.on_train_begin(args, state, TrainerControl())
        cb.observe_batch(_padded_batch())
        logs = _log_at(cb, args, state, step=1)
        assert "mfu" not in logs and logs["tokens_per_s"] > 0


def test_eval_and_save_time_is_excluded(tmp_path) -> None:
    args = _args(tmp_path)
    pause = 0.3
    times = {}
    for excluded in (False, True):
        state = TrainerState()
        cb = MetricsCallback(1.0, peak_flops=None)
        cb.on_train_begin(args, state, TrainerControl())
        control = TrainerControl(should_evaluate=excluded, should_save=excluded)
        state.global_step = 1
        cb.on_step_end(args, state, control)
        time.sleep(pause)  # stands for an evaluation, then a checkpoint save
        if excluded:
            cb.on_evaluate(args, state, control, metrics={})
            cb.on_save(args, state, control)
        cb.observe_batch(4, 4)
        times[excluded] = _log_at(cb, args, state, step=1)["step_time_s"]
    assert times[False] >= pause
    assert times[True] < pause / 3, f"eval/save not excluded: {times}"


def test_format_log() -> None:
    logs = {
        "loss": 1.23449, "grad_norm": 0.8123, "learning_rate": 2e-4, "epoch": 0.5,
        "tokens_per_s": 10412.0, "input_tokens_per_s": 12000.0, "mfu": 0.41234,
        "peak_mem_gib": 21.71, "reserved_mem_gib": 23.0, "step_time_s": 0.39,
    }  # fmt: skip
    line = format_log(logs, step=20, max_steps=100)
    assert line == (
        "step 20/100 | loss 1.234 | lr 2.0e-04 | gn 0.812 | 10.4k tok/s | MFU 41.2% | mem 21.7 GiB"
    )
    assert format_log({"eval_loss": 0.5, "epoch": 1.0}, step=7) == "step 7 | eval_loss 0.5"
    assert (
        format_log({"input_tokens_per_s": 950.0}, step=3, max_steps=-1) == "step 3 | 950 in-tok/s"
    )
    assert format_log({"tokens_per_s": 2.5e6}) == "2.5M tok/s"


# --- a real Trainer ---------------------------------------------------------------------------

ROWS = 16
LENGTHS = [5 + (7 * i) % 11 for i in range(ROWS)]  # 5..15 tokens


class _Data(torch.utils.data.Dataset):
    """Random token rows of mixed lengths; the first 2 tokens of each are a prompt (no loss)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(1, 64, (n,), generator=g) for n in LENGTHS]

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _CountingTrainer(Trainer):
    """How the run's Trainer wires the callback: every training micro-batch is observed."""

    def __init__(self, *args, metrics: MetricsCallback, **kwargs) -> None:
        super().__init__(*args, callbacks=[metrics], **kwargs)
        self.metrics = metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.metrics.observe_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def test_real_trainer_writes_metrics(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # 16 rows = 4 steps x batch 2 x 2 accumulation: every row is seen exactly once.
    args = _args(
        tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=2, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    peak = 1e12  # a made-up CPU "peak", so that MFU is logged and checked
    metrics = MetricsCallback.for_model(model, args, seq_len=16, peak_flops=peak)
    trainer = _CountingTrainer(
        model=model, args=args, train_dataset=_Data(), data_collator=_collate, metrics=metrics
    )
    trainer.train()

    lines = [json.loads(s) for s in (tmp_path / METRICS_FILE).read_text().splitlines()]
    train_logs = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4]
    assert "train_runtime" in lines[-1], "the final summary is recorded too"
    keys = {"loss", "learning_rate", "grad_norm", "tokens_per_s", "input_tokens_per_s", "mfu"}
    keys |= {"peak_mem_gib", "reserved_mem_gib", "step_time_s"}
    for r in train_logs:
        assert keys <= set(r), f"missing {keys - set(r)}"
        assert 0 < r["peak_mem_gib"] < 64 and r["loss"] > 0 and 0 < r["mfu"] < 1
    seconds = [r["step_time_s"] * 2 for r in train_logs]
    n_in = sum(r["input_tokens_per_s"] * s for r, s in zip(train_logs, seconds))
    n_tgt = sum(r["tokens_per_s"] * s for r, s in zip(train_logs, seconds))
    flops = sum(r["mfu"] * peak * s for r, s in zip(train_logs, seconds))
    assert n_in == pytest.approx(sum(LENGTHS), rel=1e-9)
    assert n_tgt == pytest.approx(sum(n - 2 for n in LENGTHS), rel=1e-9)  # no prompt, no shift
    # Independently: each row of L tokens costs L x (FLOPs per token at length L).
    want = sum(n * train_flops_per_token(config, n) for n in LENGTHS)
    assert flops == pytest.approx(want, rel=1e-9), f"FLOPs {flops} vs {want}"
    # The Trainer's own history and console carry the same numbers.
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[0]["tokens_per_s"] == train_logs[0]["tokens_per_s"]
    out = capsys.readouterr().out
    assert "step 2/4 | loss" in out and "tok/s | MFU" in out
