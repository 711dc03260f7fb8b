"""Batches for the MLX engine from turbotune's tokenized datasets.

The rows come from :func:`turbotune.data.build_datasets` (``input_ids`` and unshifted
``labels``, -100 where there is no loss: response-only masks included) and are padded by the
same :class:`~turbotune.data.PaddedCollator` the Trainer uses, then handed to MLX as arrays.
Right padding needs no attention mask under causal attention: a padded position comes after
every real token of its row, so no real token attends to it, and its label is -100.

Order: a seeded permutation per epoch (``seed + epoch``), every row once per epoch, the last
batch possibly smaller (the Trainer's default sampler keeps it too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from turbotune.data import PaddedCollator
from turbotune.data.tokenization import IGNORE_INDEX

__all__ = ["Batch", "iterate_batches", "steps_per_epoch", "total_steps"]


@dataclass
class Batch:
    """One micro-batch, shifted for next-token prediction."""

    inputs: mx.array
    """(B, T-1) int32 token ids fed to the model."""
    targets: mx.array
    """(B, T-1) int32 next-token ids, -100 where there is no loss."""
    input_tokens: int
    """Non-padding tokens of the unshifted rows."""
    target_tokens: int
    """Tokens that carry a loss."""


def to_batch(features: list[dict[str, Any]], pad_id: int) -> Batch:
    """Pad rows with the Trainer's collator and shift them for the next-token loss."""
    padded = PaddedCollator(pad_id)(features)
    ids = padded["input_ids"].numpy().astype(np.int32)
    labels = padded["labels"].numpy().astype(np.int32)
    targets = labels[:, 1:]
    return Batch(
        inputs=mx.array(ids[:, :-1]),
        targets=mx.array(targets),
        input_tokens=int(padded["attention_mask"].sum()),
        target_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def iterate_batches(
    dataset: Any, batch_size: int, pad_id: int, seed: int, *, shuffle: bool = True
) -> Iterator[Batch]:
    """Micro-batches over the dataset forever, one seeded permutation per epoch.

    Args:
        dataset: rows with ``input_ids`` and ``labels`` (a ``datasets.Dataset`` or a list).
        batch_size: rows per micro-batch.
        pad_id: the tokenizer's pad id.
        seed: base seed of the epoch permutations.
        shuffle: off: rows in order (evaluation).
    """
    n = len(dataset)
    epoch = 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            rows = [dataset[int(i)] for i in order[start : start + batch_size]]
            yield to_batch(rows, pad_id)
        epoch += 1


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (a last partial step counts)."""
    return max(1, math.ceil(math.ceil(rows / batch_size) / accumulation))


def total_steps(max_steps: int, epochs: float, per_epoch: int) -> int:
    """``max_steps`` when positive, else ``epochs`` worth of steps."""
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
