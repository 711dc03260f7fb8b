"""The multipack sampler: each sample exactly once per epoch, token budget respected, ranks
balanced within the stated bound, deterministic per (seed, epoch), and resumable by skipping.

Lengths are real: GSM8K train and the Alpaca demo rows of ../shared/data, one token per 4 bytes
of prompt + response (a tokenizer-free proxy; tokenizing 8k rows takes seconds on this CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from turbotune.data.multipack import MultipackBatchSampler, pack_best_fit_decreasing


def _proxy_lengths(rows: list[dict], keys: tuple[str, ...]) -> list[int]:
    return [max(1, len(" ".join(str(r.get(k, "")) for k in keys).encode()) // 4) for r in rows]


@pytest.fixture(scope="module")
def gsm8k_lengths(shared_data: Path) -> list[int]:
    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _proxy_lengths(rows, ("question", "answer"))


@pytest.fixture(scope="module")
def alpaca_lengths(shared_data: Path) -> list[int]:
    path = shared_data / "alpaca" / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return _proxy_lengths(json.loads(path.read_text()), ("instruction", "input", "output"))


@pytest.fixture(params=["gsm8k_lengths", "alpaca_lengths"])
def lengths(request) -> list[int]:
    return request.getfixturevalue(request.param)


def test_best_fit_decreasing_packs_everything_within_capacity(lengths):
    capacity = 2048
    bins = pack_best_fit_decreasing(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= capacity
    lower_bound = -(-sum(lengths) // capacity)
    assert len(bins) <= lower_bound * 1.03 + 1, f"{len(bins)} bins, lower bound {lower_bound}"
    # Every bin but the last opened is fuller than capacity - max_len (see the module note).
    assert min(loads[:-1]) > capacity - max(lengths)


def test_oversized_sequence_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_best_fit_decreasing([10, 300, 20], 256)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_every_sample_exactly_once_per_epoch_and_constant_length(lengths, world):
    sampler = MultipackBatchSampler(lengths, 2048, world_size=world, seed=5)
    assert len(sampler) % world == 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(lengths))), f"epoch {epoch}: a sample missing or repeated"
        assert max(sum(lengths[i] for i in b) for b in batches) <= 2048


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_of_a_step_are_balanced_within_the_stated_bound(lengths, world):
    """Token counts of the ranks of one step differ by less than the longest sequence, in every
    step except at most three (the tail holding the last bin and the split halves)."""
    sampler = MultipackBatchSampler(lengths, 2048, world_size=world, seed=1)
    tokens = np.array([sum(lengths[i] for i in b) for b in sampler.batches(0)])
    steps = tokens.reshape(-1, world)
    spread = steps.max(axis=1) - steps.min(axis=1)
    over = int((spread >= max(lengths)).sum())
    assert over <= 3, f"{over} steps exceed the bound; spreads {sorted(spread)[-5:]}"
    assert np.median(spread) < 0.01 * 2048, f"median spread {np.median(spread):.1f} tokens"


def test_deterministic_per_seed_and_epoch(alpaca_lengths):
    a = MultipackBatchSampler(alpaca_lengths, 1024, world_size=2, seed=3)
    b = MultipackBatchSampler(alpaca_lengths, 1024, world_size=2, seed=3)
    assert a.batches(4) == b.batches(4)
    assert a.batches(0) != a.batches(1), "epochs must reshuffle"
    other = MultipackBatchSampler(alpaca_lengths, 1024, world_size=2, seed=4)
    assert other.batches(0) != a.batches(0), "seeds must differ"


def test_epochs_change_which_samples_share_a_batch(gsm8k_lengths):
    sampler = MultipackBatchSampler(gsm8k_lengths, 2048, seed=0)
    groups = [{frozenset(b) for b in sampler.batches(e)} for e in (0, 1)]
    shared = len(groups[0] & groups[1]) / len(groups[0])
    assert shared < 0.5, f"{shared:.0%} of the micro-batches are identical in two epochs"


def test_batches_are_dealt_to_ranks_as_accelerate_shards_them(alpaca_lengths):
    """accelerate's BatchSamplerShard gives rank r the batches r, r + W, ...: the rank's view."""
    from accelerate.data_loader import BatchSamplerShard

    world = 4
    sampler = MultipackBatchSampler(alpaca_lengths, 1024, world_size=world, seed=2)
    sampler.set_epoch(1)
    for rank in range(world):
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank)
        got = list(shard)
        assert got == sampler.rank_batches(rank, epoch=1)
        assert len(got) == len(shard) == len(sampler) // world


def test_resume_by_skipping_batches_continues_the_same_sequence(alpaca_lengths):
    """What the Trainer does on resume: a fresh sampler, set_epoch, skip the trained batches."""
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader

    def loader(sampler):
        return DataLoader(range(len(alpaca_lengths)), batch_sampler=sampler, collate_fn=list)

    first = MultipackBatchSampler(alpaca_lengths, 1024, seed=9)
    first.set_epoch(2)
    full = list(loader(first))
    resumed = MultipackBatchSampler(alpaca_lengths, 1024, seed=9)
    resumed.set_epoch(2)
    rest = list(skip_first_batches(loader(resumed), 7))
    assert rest == full[7:]
