"""PaddingFreeCollator: one row, restarting positions, boundaries, labels cut at every boundary."""

from __future__ import annotations

import pytest
import torch

from turbotune.data.padding_free import (
    PaddingFreeCollator,
    cu_seqlens_from_lengths,
    position_ids_from_lengths,
)

ROWS = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3},
    {"input_ids": [8, 9], "labels": [8, 9], "length": 2},
    {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "length": 4},
]


def test_one_row_with_positions_boundaries_and_cut_labels():
    batch = PaddingFreeCollator()(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # The first label of every example is -100: the previous example's last token predicts
    # nothing across the boundary.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert "attention_mask" not in batch


def test_matches_transformers_flattening_collator():
    """The same tensors as transformers' DataCollatorWithFlattening (its varlen kwargs on)."""
    from transformers import DataCollatorWithFlattening

    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{k: v for k, v in r.items() if k != "length"} for r in ROWS]
    )
    ours = PaddingFreeCollator()(ROWS)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[key].long(), torch.as_tensor(theirs[key]).long()), key
    assert ours["max_length_q"] == int(theirs["max_length_q"])


def test_without_labels_every_token_is_a_target_but_the_first_of_each():
    batch = PaddingFreeCollator()([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}])
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, 5]]


def test_position_only_mode_and_helpers():
    batch = PaddingFreeCollator(return_varlen_kwargs=False)(ROWS)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert cu_seqlens_from_lengths([2, 1]).tolist() == [0, 2, 3]
    assert position_ids_from_lengths([2, 1]).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize(
    "rows, match",
    [([], "empty batch"), ([{"input_ids": [1, 2], "labels": [1]}], "labels"),
     ([{"input_ids": []}], "empty")],
)  # fmt: skip
def test_bad_batches_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        PaddingFreeCollator()(rows)
