"""Padding-free batches: the examples of a batch concatenated into one row, nothing padded.

Design note (after transformers' ``DataCollatorWithFlattening`` and the flash-attention varlen
interface). A batch of ``n`` examples of lengths ``L_1..L_n`` becomes ONE row of ``T = sum L_i``
tokens:

* ``input_ids`` ``(1, T)``: the examples back to back;
* ``position_ids`` ``(1, T)``: ``0..L_i-1`` for each example, so every rotary embedding (the
  model's own or the fused kernel, which reads cos/sin per token) sees the positions the
  example would have alone;
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` ``(n + 1,)`` int32: cumulative lengths ``[0, L_1, L_1 + L_2,
  ..., T]``, and ``max_length_q`` / ``max_length_k`` (python ints): the longest example — the
  keyword arguments transformers' flash-attention path and :mod:`turbotune.attention` read to keep
  every token inside its own example;
* ``labels`` ``(1, T)``: the examples' labels, with the FIRST label of every example set to -100.

Why the first label: labels stay unshifted (the model's loss predicts ``labels[t + 1]`` from
position ``t``). In a padded batch the first label of a row is never a target (nothing precedes
it). In the packed row, the first label of example ``i`` sits right after the last token of
example ``i - 1``; setting it to -100 keeps the last token of ``i - 1`` from predicting the first
token of ``i``. The set of (position, target) pairs is then exactly that of the padded batch, so
the summed loss, the target-token count (``labels[..., 1:] != -100``) and the mean are the same.

No ``attention_mask`` is returned: there is no padding, and transformers' mask builders treat
an absent mask plus restarting ``position_ids`` as packed sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from turbotune.data.tokenization import IGNORE_INDEX

__all__ = ["PaddingFreeCollator", "cu_seqlens_from_lengths", "position_ids_from_lengths"]


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """``[0, L_1, L_1 + L_2, ..., sum L]`` as int32 (what varlen attention kernels take).

    Args:
        lengths: ``n`` positive lengths.

    Returns:
        ``(n + 1,)`` int32 tensor.
    """
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return out


def position_ids_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """Positions that restart at 0 for every sequence: ``(1, sum L)`` int64."""
    return torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)


class PaddingFreeCollator:
    """Concatenates a batch of tokenized examples into one padding-free row.

    Args:
        label_separator: label written at the first position of every example (ignored by
            the loss).
        return_varlen_kwargs: also return ``cu_seq_lens_q/k`` and ``max_length_q/k``. Without
            them, :mod:`turbotune.attention` derives the boundaries from ``position_ids``
            (one device-to-host copy per forward).

    Call it with a list of examples, each a mapping with ``input_ids`` and optionally ``labels``
    (missing: train on every token); other keys (``length``, ...) are ignored. Returns the keys
    listed in the module docstring.
    """

    def __init__(self, label_separator: int = IGNORE_INDEX, return_varlen_kwargs: bool = True):
        self.label_separator = label_separator
        self.return_varlen_kwargs = return_varlen_kwargs

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PaddingFreeCollator got an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i, feature in enumerate(features):
            row_ids = _as_list(feature["input_ids"])
            row_labels = _as_list(feature["labels"]) if "labels" in feature else list(row_ids)
            if len(row_ids) != len(row_labels):
                raise ValueError(
                    f"example {i} of the batch has {len(row_ids)} input_ids but "
                    f"{len(row_labels)} labels"
                )
            if not row_ids:
                raise ValueError(f"example {i} of the batch is empty")
            ids.extend(row_ids)
            labels.append(self.label_separator)
            labels.extend(row_labels[1:])
            lengths.append(len(row_ids))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
            "labels": torch.tensor(labels, dtype=torch.long).unsqueeze(0),
            "position_ids": position_ids_from_lengths(lengths),
        }
        if self.return_varlen_kwargs:
            cu = cu_seqlens_from_lengths(lengths)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        return batch


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)
