"""Collators: tokenized examples to a batch of tensors, and the target-token count.

Design: a collator is a plain callable ``list[dict] -> dict[str, Tensor]`` (what the Hugging Face
Trainer's ``data_collator`` takes). :class:`PaddedCollator` right-pads to the longest example,
rounded up to a multiple (tensor-core friendly shapes, fewer recompilations). Labels are not
shifted: Hugging Face causal-LM losses shift inside the model, so labels stay aligned with
``input_ids`` and :func:`count_target_tokens` applies the shift when counting. A padding-free
collator (one packed row plus position ids / cumulative lengths) will sit beside this one with
the same call signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from turbotune.data.tokenization import IGNORE_INDEX


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS, else 0.

    Any id works: padded positions get attention mask 0 and label -100, so they affect nothing.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


class PaddedCollator:
    """Right-pads ``input_ids`` and ``labels`` and builds the attention mask.

    Args:
        pad_token_id: id written into padded positions of ``input_ids``.
        pad_to_multiple_of: the padded length is rounded up to a multiple of this (``None`` or
            1: no rounding).
        label_pad: label of padded positions (ignored by the loss).

    Call it with a list of examples, each a mapping with ``input_ids`` and optionally ``labels``
    (missing: the ids themselves, i.e. train on every token); other keys are ignored. Returns
    ``input_ids`` and ``labels`` as ``(batch, seq)`` int64 and ``attention_mask`` as
    ``(batch, seq)`` int64 of 1 (token) / 0 (padding).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = 8, label_pad: int = IGNORE_INDEX
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad = label_pad

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PaddedCollator got an empty batch")
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) if "labels" in f else list(i) for f, i in zip(features, ids)]
        for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            if len(row_ids) != len(row_labels):
                raise ValueError(
                    f"example {i} of the batch has {len(row_ids)} input_ids but "
                    f"{len(row_labels)} labels"
                )
        width = _round_up(max(len(row) for row in ids), self.pad_to_multiple_of)
        batch = len(ids)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((batch, width), self.label_pad, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            n = len(row_ids)
            input_ids[i, :n] = torch.as_tensor(row_ids, dtype=torch.long)
            label_ids[i, :n] = torch.as_tensor(row_labels, dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of tokens the loss is computed on: labels other than ``ignore_index`` after the
    causal shift (``labels[..., 1:]``; the first position is never predicted).

    Args:
        labels: ``(batch, seq)`` or ``(seq,)`` unshifted labels.
    """
    return int((labels[..., 1:] != ignore_index).sum().item())
