"""Benchmark batches: random token ids of a fixed length, or a real dataset's length mix.

Every batch is built before timing starts and placed on the device, so the timed loop measures
training only. Each batch carries ``tokens``: its non-padding tokens (the throughput unit).

* ``random``: ``batch_size x seq_len`` ids drawn uniformly from the vocabulary, labels = ids,
  no attention mask (pure causal attention, nothing padded).
* a dataset file: rows tokenized by :func:`turbotune.data.build_datasets` (truncated at
  ``seq_len``), drawn in a seeded shuffled order, right-padded per batch to a multiple of 8 by
  :class:`turbotune.data.PaddedCollator`: the real length distribution, with its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbotune.errors import DataError


@dataclass
class Batch:
    """One training step's inputs, on the device."""

    inputs: dict[str, torch.Tensor]
    """``input_ids``, ``labels`` and (padded batches) ``attention_mask``, ``(batch, seq)``."""
    tokens: int
    """Non-padding tokens."""
    lengths: list[int]
    """Non-padding length of each row (for the effective attention length)."""


def random_batches(
    vocab_size: int, batch_size: int, seq_len: int, n: int, *, seed: int, device: torch.device
) -> list[Batch]:
    """``n`` batches of uniform random ids, ``(batch_size, seq_len)`` each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
        out.append(
            Batch({"input_ids": ids, "labels": ids}, batch_size * seq_len, [seq_len] * batch_size)
        )
    return out


def dataset_batches(
    path: str,
    tokenizer_path: str,
    batch_size: int,
    seq_len: int,
    n: int,
    *,
    vocab_size: int,
    seed: int,
    device: torch.device,
) -> list[Batch]:
    """``n`` padded batches of a dataset file's rows (see the module docstring).

    Raises:
        DataError: the tokenizer's ids do not fit the model's vocabulary.
    """
    from turbotune.config import DataConfig, ModelConfig
    from turbotune.data import PaddedCollator, build_datasets
    from turbotune.data.collators import resolve_pad_token_id
    from turbotune.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path=tokenizer_path))
    train, _ = build_datasets(DataConfig(path=path, max_length=seq_len, seed=seed), tokenizer)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = PaddedCollator(resolve_pad_token_id(tokenizer), pad_to_multiple_of=8)
    out = []
    for step in range(n):
        rows = [train[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        batch = collate(rows)
        top = int(batch["input_ids"].max())
        if top >= vocab_size:
            raise DataError(
                f"token id {top} of tokenizer '{tokenizer_path}' does not fit the model's "
                f"vocabulary of {vocab_size}: pick a model whose vocabulary matches the tokenizer"
            )
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        inputs = {k: v.to(device) for k, v in batch.items()}
        out.append(Batch(inputs, int(sum(lengths)), [int(x) for x in lengths]))
    return out


def effective_seq_len(batches: list[Batch]) -> float:
    """``sum(L^2) / sum(L)`` over all rows: the length that gives the batches' attention FLOPs."""
    lengths = [x for b in batches for x in b.lengths]
    return sum(x * x for x in lengths) / max(1, sum(lengths))
