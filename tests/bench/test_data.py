"""Benchmark batches: random ids, and a real dataset's lengths counted without padding."""

from __future__ import annotations

import pytest
import torch

from turbotune.bench.data import dataset_batches, effective_seq_len, random_batches
from turbotune.errors import DataError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def alpaca_and_tokenizer(request):
    shared = request.getfixturevalue("shared_data")
    data = shared / "alpaca" / "alpaca_tiny.json"
    tok = shared / "stories260K" / "hf"
    if not data.is_file() or not (tok / "tokenizer.json").is_file():
        pytest.skip("alpaca_tiny.json or the stories260K tokenizer is missing")
    return str(data), str(tok)


def test_random_batches_are_fixed_length_and_seeded():
    a = random_batches(100, 3, 20, 2, seed=1, device=CPU)
    b = random_batches(100, 3, 20, 2, seed=1, device=CPU)
    assert [x.tokens for x in a] == [60, 60]
    assert torch.equal(a[1].inputs["input_ids"], b[1].inputs["input_ids"])
    assert not torch.equal(a[0].inputs["input_ids"], a[1].inputs["input_ids"])
    assert int(a[0].inputs["input_ids"].max()) < 100 and "attention_mask" not in a[0].inputs
    assert effective_seq_len(a) == 20


def test_dataset_batches_count_non_padding_tokens(alpaca_and_tokenizer):
    data, tok = alpaca_and_tokenizer
    batches = dataset_batches(data, tok, 4, 512, 3, vocab_size=512, seed=0, device=CPU)
    for b in batches:
        mask = b.inputs["attention_mask"]
        assert b.tokens == int(mask.sum()) == sum(b.lengths)
        assert max(b.lengths) <= 512 and mask.shape[1] % 8 == 0
        assert (b.inputs["labels"][mask == 0] == -100).all()
    lengths = [x for b in batches for x in b.lengths]
    assert len(set(lengths)) > 1, lengths  # real rows: mixed lengths
    assert min(lengths) < effective_seq_len(batches) <= max(lengths)


def test_dataset_vocabulary_must_fit_the_model(alpaca_and_tokenizer):
    data, tok = alpaca_and_tokenizer
    with pytest.raises(DataError, match="does not fit the model's vocabulary of 100"):
        dataset_batches(data, tok, 2, 32, 1, vocab_size=100, seed=0, device=CPU)


def test_worker_on_a_dataset_reports_real_lengths(alpaca_and_tokenizer, tmp_path):
    from turbotune.bench.setups import DEFAULT_LORA
    from turbotune.bench.worker import run_point

    data, tok = alpaca_and_tokenizer
    spec = {
        "scenario": "hf-lora", "point": "p", "builtin": "hf-lora", "config": None,
        "model": "llama-tiny", "batch_size": 2, "seq_len": 1024, "gradient_checkpointing": False,
        "gpus": 1, "warmup": 1, "steps": 2, "precision": "fp32", "learning_rate": 2e-4,
        "lora": DEFAULT_LORA, "attn_implementation": "sdpa", "data": data, "tokenizer": tok,
        "seed": 0, "output_dir": str(tmp_path),
    }  # fmt: skip
    result = run_point(spec)
    assert result["status"] == "ok"
    assert result["tokens_per_step"] < 2 * 1024  # rows are shorter; padding is not counted
    assert result["seq_len_effective"] < 1024 and len(result["losses"]) == 3
