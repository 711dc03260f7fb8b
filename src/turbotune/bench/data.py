"""Benchmark batches: random token ids of a fixed length, or a real dataset's length mix.

Every batch is built before timing starts and placed on the device, so the timed loop measures
training only. Each batch carries ``tokens``: its non-padding tokens (the throughput unit).

* ``random``: ``batch_size x seq_len`` ids drawn uniformly from the vocabulary, labels = ids,
  no attention mask (pure causal attention, nothing padded).
* a dataset file: rows tokenized as training tokenizes them (truncated at ``seq_len``; a
  .json/.jsonl prompt/target file is read by :mod:`turbotune.bench.rows`, without the
  ``datasets`` package, anything else goes through :func:`turbotune.data.build_datasets`),
  drawn in a seeded shuffled order, right-padded per batch to a multiple of 8 by
  :class:`turbotune.data.PaddedCollator`: the real length distribution, with its padding.

``padding_free``: the same rows of each step (same seed, same order) concatenated into one row
by :class:`turbotune.data.padding_free.PaddingFreeCollator` instead: the same real tokens per
step, no padding — the comparison the padding-free benchmark makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from turbotune.errors import DataError


@dataclass
class Batch:
    """One training step's inputs, on the device."""

    inputs: dict[str, Any]
    """``input_ids``, ``labels`` and (padded batches) ``attention_mask``, ``(batch, seq)``;
    padding-free batches: one row plus ``position_ids`` and the varlen keywords."""
    tokens: int
    """Non-padding tokens."""
    lengths: list[int]
    """Non-padding length of each row (for the effective attention length)."""


def random_batches(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    n: int,
    *,
    seed: int,
    device: torch.device,
    padding_free: bool = False,
) -> list[Batch]:
    """``n`` batches of uniform random ids, ``(batch_size, seq_len)`` each (``padding_free``:
    the same rows as one packed row)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        if padding_free:
            rows = [{"input_ids": row.tolist()} for row in ids]
            out.append(_packed(rows, device))
            continue
        ids = ids.to(device)
        out.append(
            Batch({"input_ids": ids, "labels": ids}, batch_size * seq_len, [seq_len] * batch_size)
        )
    return out


def _packed(rows: list[dict], device: torch.device) -> Batch:
    """One padding-free batch of ``rows`` on ``device``."""
    from turbotune.data.padding_free import PaddingFreeCollator

    batch = PaddingFreeCollator()(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return Batch(inputs, sum(lengths), lengths)


def _file_rows(path: str, tokenizer: Any, seq_len: int, wanted: list[int], seed: int) -> list:
    """The tokenized rows ``wanted`` (indices into the seeded order) of a data file."""
    from turbotune.bench.rows import read_rows, resolve_shared_path, tokenize_rows

    resolved = resolve_shared_path(path)
    if resolved.suffix.lower() in (".json", ".jsonl"):
        raw = read_rows(resolved)
        order = _order(len(raw), seed)
        picked = tokenize_rows([raw[order[i % len(raw)]] for i in wanted], tokenizer, seq_len)
        return picked
    from turbotune.config import DataConfig
    from turbotune.data import build_datasets

    train, _ = build_datasets(
        DataConfig(path=str(resolved), max_length=seq_len, seed=seed), tokenizer
    )
    order = _order(len(train), seed)
    return [train[order[i % len(train)]] for i in wanted]


def _order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


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
    padding_free: bool = False,
) -> list[Batch]:
    """``n`` batches of a dataset file's rows (see the module docstring).

    Raises:
        DataError: the tokenizer's ids do not fit the model's vocabulary.
    """
    from turbotune.bench.rows import resolve_shared_path
    from turbotune.config import ModelConfig
    from turbotune.data import PaddedCollator
    from turbotune.data.collators import resolve_pad_token_id
    from turbotune.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path=str(resolve_shared_path(tokenizer_path))))
    rows = _file_rows(path, tokenizer, seq_len, list(range(n * batch_size)), seed)
    top = max(max(r["input_ids"]) for r in rows)
    if top >= vocab_size:
        raise DataError(
            f"token id {top} of tokenizer '{tokenizer_path}' does not fit the model's "
            f"vocabulary of {vocab_size}: pick a model whose vocabulary matches the tokenizer"
        )
    collate = PaddedCollator(resolve_pad_token_id(tokenizer), pad_to_multiple_of=8)
    out = []
    for step in range(n):
        step_rows = rows[step * batch_size : (step + 1) * batch_size]
        if padding_free:
            out.append(_packed(step_rows, device))
            continue
        batch = collate(step_rows)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        inputs = {k: v.to(device) for k, v in batch.items()}
        out.append(Batch(inputs, int(sum(lengths)), [int(x) for x in lengths]))
    return out


def effective_seq_len(batches: list[Batch]) -> float:
    """``sum(L^2) / sum(L)`` over all rows: the length that gives the batches' attention FLOPs."""
    lengths = [x for b in batches for x in b.lengths]
    return sum(x * x for x in lengths) / max(1, sum(lengths))
