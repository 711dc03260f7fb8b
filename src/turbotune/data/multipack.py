"""Multipack: sequences packed into micro-batches by token count, balanced over data-parallel ranks.

Design note (after the multipack samplers of OpenChat/Axolotl, with a packing that keeps the
Trainer's epoch arithmetic exact).

1. Packing. Best-fit decreasing (BFD) bin packing of the sequence lengths into bins of
   ``max_tokens``: longest first, each into the fullest bin it still fits (FFD's guarantee,
   at most ``11/9 OPT + 6/9`` bins, and in practice no worse). Every bin opened before the last
   one holds more than ``max_tokens - max_len`` tokens (the sequence that opened the last bin,
   at most ``max_len`` long, did not fit in any of them).
2. Ranks. The bin count is made a multiple of ``world_size`` by splitting the fullest
   multi-sequence bins (at most ``world_size - 1`` splits), so every rank runs the same number of
   micro-batches and no sample is dropped or repeated. Bins sorted by tokens are grouped ``world_size``
   at a time: one step's ranks get bins of neighbouring size, so their token counts differ by
   less than ``max_len`` in every step except at most three (the tail that holds the last bin
   and the split halves).
3. Epochs. The packing is a function of the lengths only, so the number of micro-batches is
   the same every epoch (the Trainer's ``len(dataloader)``, its step counts and the batches it
   skips when it resumes stay exact). Each epoch draws, from ``(seed, epoch)``: which of the
   samples of EQUAL length fills each slot of the packing (so bins change their members, not
   their token counts), the order of the steps, and the rank order inside a step.

The sampler is a batch sampler of *global* batches: step ``s`` is the ``world_size`` consecutive
batches ``s * world_size + r``, ``r`` = the rank, which is exactly how accelerate's
``BatchSamplerShard`` deals batches out to processes. Resuming in the middle of an epoch skips
the first batches of the same deterministic sequence (``set_epoch`` must be called; the
Trainer does it through :class:`turbotune.train.trainer.TurbotuneTrainer`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["MultipackBatchSampler", "pack_best_fit_decreasing"]


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing.

    Args:
        lengths: ``n`` item sizes (tokens per sequence), each at most ``capacity``.
        capacity: bin size (tokens per micro-batch).

    Returns:
        Bins in opening order, each a list of item indices (longest first); ties between equal
        lengths are broken by index, so the result is a function of ``lengths`` alone.

    Raises:
        ValueError: an item is longer than ``capacity``.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.size and int(sizes.max()) > capacity:
        raise ValueError(
            f"a sequence of {int(sizes.max())} tokens does not fit a micro-batch of {capacity}: "
            "raise max_tokens to at least data.max_length"
        )
    order = np.argsort(-sizes, kind="stable")
    bins: list[list[int]] = []
    # Open bins keyed by (remaining space, bin id), kept sorted: the best fit for an item is the
    # first key whose remaining space is at least its size.
    free: list[tuple[int, int]] = []
    for index in order.tolist():
        size = int(sizes[index])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - size, len(bins) - 1))
            continue
        space, b = free.pop(at)
        bins[b].append(index)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return bins


def _split_to_multiple(bins: list[list[int]], sizes: np.ndarray, multiple: int) -> list[list[int]]:
    """Split the fullest multi-sequence bins until the count is a multiple of ``multiple``;
    each split deals the bin's sequences (longest first) to the lighter half."""
    bins = [list(b) for b in bins]
    while len(bins) % multiple:
        splittable = [i for i, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            raise ValueError(
                f"{sum(len(b) for b in bins)} sequences cannot fill {multiple} ranks equally"
            )
        i = max(splittable, key=lambda j: (int(sizes[bins[j]].sum()), -j))
        halves: tuple[list[int], list[int]] = ([], [])
        for index in sorted(bins[i], key=lambda j: (-int(sizes[j]), j)):
            lighter = min((0, 1), key=lambda h: int(sizes[halves[h]].sum()) if halves[h] else 0)
            halves[lighter].append(index)
        bins[i] = halves[0]
        bins.append(halves[1])
    return bins


class MultipackBatchSampler:
    """Batch sampler of token-budgeted, rank-balanced micro-batches (see the module docstring).

    Args:
        lengths: tokens of every sample of the dataset.
        max_tokens: token budget of one micro-batch (one rank, one forward).
        world_size: data-parallel ranks.
        seed: the run's seed.
        shuffle: draw the per-epoch permutations (off: the same order every epoch).

    Iterating yields lists of dataset indices: ``len(self)`` global batches, ``world_size`` per
    step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if max_tokens < 1 or world_size < 1:
            raise ValueError("max_tokens and world_size must be positive")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0 or int(self.lengths.min()) < 1:
            raise ValueError("multipack needs at least one sample and no empty sample")
        self.max_tokens = max_tokens
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        packed = pack_best_fit_decreasing(self.lengths, max_tokens)
        self.bins = _split_to_multiple(packed, self.lengths, world_size)
        self.batch_size = None  # micro-batches have varying sizes (accelerate reads this)
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutations :meth:`__iter__` draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.bins)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All global batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = self._rng(epoch)
        n = self.lengths.size
        slot_to_sample = np.arange(n)
        if self.shuffle:  # equal lengths trade places: same token counts, new members
            canonical = np.lexsort((np.arange(n), self.lengths))
            drawn = np.lexsort((rng.random(n), self.lengths))
            slot_to_sample[canonical] = drawn
        loads = np.array([int(self.lengths[b].sum()) for b in self.bins])
        by_load = sorted(range(len(self.bins)), key=lambda i: (-loads[i], i))
        w = self.world_size
        steps = [by_load[s : s + w] for s in range(0, len(by_load), w)]
        if self.shuffle:
            steps = [steps[i] for i in rng.permutation(len(steps))]
            steps = [[step[i] for i in rng.permutation(w)] for step in steps]
        return [slot_to_sample[self.bins[b]].tolist() for step in steps for b in step]

    def rank_batches(self, rank: int, epoch: int | None = None) -> list[list[int]]:
        """The micro-batches ``rank`` runs in ``epoch`` (what ``BatchSamplerShard`` gives it)."""
        return self.batches(epoch)[rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def efficiency(self) -> float:
        """Tokens over ``len(self) * max_tokens``: the share of the budget that is used."""
        return float(self.lengths.sum()) / (len(self.bins) * self.max_tokens)
