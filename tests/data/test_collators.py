"""PaddedCollator and count_target_tokens on real tokenized rows."""

from __future__ import annotations

import pytest
import torch

from turbotune.config import DataConfig
from turbotune.data import (
    IGNORE_INDEX,
    PaddedCollator,
    build_datasets,
    count_target_tokens,
    resolve_pad_token_id,
)


@pytest.fixture(scope="module")
def alpaca_examples(stories_tokenizer, alpaca_tiny):
    train, _ = build_datasets(DataConfig(path=str(alpaca_tiny), max_samples=12), stories_tokenizer)
    return [train[i] for i in range(len(train))]


def test_pad_token_resolution(stories_tokenizer, chat_tokenizer):
    assert stories_tokenizer.pad_token_id is None
    assert resolve_pad_token_id(stories_tokenizer) == stories_tokenizer.eos_token_id
    assert resolve_pad_token_id(chat_tokenizer) == chat_tokenizer.pad_token_id == 2


@pytest.mark.parametrize("multiple", [None, 1, 8, 64])
def test_padding(alpaca_examples, multiple):
    features = alpaca_examples[:5]
    batch = PaddedCollator(pad_token_id=0, pad_to_multiple_of=multiple)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    longest = max(len(f["input_ids"]) for f in features)
    width = batch["input_ids"].shape[1]
    if multiple in (None, 1):
        assert width == longest
    else:
        assert width % multiple == 0 and longest <= width < longest + multiple
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["labels"][i, :n].tolist() == f["labels"]  # not shifted
        assert (batch["input_ids"][i, n:] == 0).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    for key in batch:
        assert batch[key].dtype == torch.long and batch[key].shape == (5, width)


def test_missing_labels_train_on_ids_and_custom_label_pad():
    batch = PaddedCollator(pad_token_id=7, pad_to_multiple_of=4, label_pad=-1)(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4], "length": 1}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 7, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3, -1], [4, -1, -1, -1]]


def test_mismatched_lengths_and_empty_batch():
    collate = PaddedCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="example 0 of the batch has 2 input_ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_count_target_tokens_matches_the_loss(alpaca_examples):
    batch = PaddedCollator(pad_token_id=0)(alpaca_examples)
    labels = batch["labels"]
    # The count is what cross-entropy averages over: shifted labels that are not ignored.
    logits = torch.randn(*labels.shape, 512)
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, reduction="sum")
    mean = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels)
    n = count_target_tokens(labels)
    assert n == sum(sum(t != IGNORE_INDEX for t in f["labels"][1:]) for f in alpaca_examples)
    torch.testing.assert_close(total / n, mean)


def test_count_target_tokens_skips_the_first_position():
    labels = torch.tensor([[5, IGNORE_INDEX, 6, 7], [8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    assert count_target_tokens(labels) == 3  # 6, 7 and 9; 5 and 8 are never predicted
    assert count_target_tokens(labels[0]) == 2


def test_hf_model_loss_uses_the_unshifted_labels(alpaca_examples, stories260k):
    """The real stories260K model's own loss on a collated batch equals cross-entropy of its
    logits against labels shifted once, averaged over count_target_tokens: so the labels must
    not be pre-shifted, and the count is the loss's denominator."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    batch = PaddedCollator(pad_token_id=0)(alpaca_examples[:4])
    batch = {k: v[:, :256] for k, v in batch.items()}  # within the model's 512 positions
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits.float(), batch["labels"]
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    expected = total / count_target_tokens(labels)
    diff = (out.loss - expected).abs().item()
    assert diff < 1e-5, f"model loss {out.loss.item()} vs shifted CE {expected.item()}: {diff=}"
