"""The expert sort of :func:`~turbotune.moe.plan.plan_experts` as two Triton launches (few experts).

Design note. The eager plan is about ten launches (a stable radix sort with its copies, a
zero-fill and a ``scatter_add`` for the counts, a ``cumsum`` and its cast, an ``arange`` and an
``index_put`` for the inverse permutation, a ``floor_divide`` for the tokens): ~90-100 us of GPU
time on an H100 at 4096-32768 slots (graph replays, where only GPU time counts), and 10-20 us of
host work each in an eager step. For few experts the same plan is a counting sort over blocks of
slots, each block one program:

- ``_block_counts``: each block counts its slots per expert (a one-hot ``[BLOCK, E]`` tile
  summed over its rows) into ``[blocks, E]``;
- ``_place``: each block reads that whole table (a few KB): the experts' totals, their exclusive
  scan (where each expert's rows start) and the counts of the blocks before it; a slot's sorted
  row is its expert's start, plus its expert's slots in earlier blocks, plus its rank among the
  block's own slots of that expert (an inclusive ``cumsum`` down the one-hot tile). Ties keep
  slot order: exactly the stable sort's result.

The one-hot tile is ``BLOCK x E_PAD`` with ``E_PAD`` the next power of two of the experts: worth
it while the experts are few (:data:`MAX_EXPERTS`); many experts (Qwen3-30B-A3B's 128) keep the
eager plan. (A first version ran both passes in one program: 41 us at 8192 slots but 571 us at
65536, linear in the slots.)
"""

from __future__ import annotations

import torch

from turbotune.ops._triton import HAS_TRITON, tl, triton, use_triton

ENABLED = True
"""Run the kernels where they fit (False: the eager sort everywhere; ``benchmarks/moe_layer.py``'s
``:eager-plan`` variant)."""
MAX_EXPERTS = 16
"""Most experts the counting sort takes."""
TILE = 8192
"""One-hot elements per block (``BLOCK * E_PAD``): 32 per thread of 8 warps."""
MAX_BLOCKS = 256
"""Most blocks: every program of ``_place`` holds the ``[blocks, E_PAD]`` table (at most 4096
values: 131072 slots over 16 experts, 262144 over 8)."""


if HAS_TRITON:

    @triton.jit
    def _one_hot(index_ptr, block, S, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Block ``block``'s slots, their in-range mask and their ``[BLOCK, E_PAD]`` one-hot."""
        slots = block * BLOCK + tl.arange(0, BLOCK)
        in_range = slots < S
        ids = tl.load(index_ptr + slots, mask=in_range, other=E_PAD).to(tl.int32)
        experts = tl.arange(0, E_PAD)
        return slots, in_range, (ids[:, None] == experts[None, :]).to(tl.int32)

    @triton.jit
    def _block_counts_kernel(index_ptr, table_ptr, S, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """``table[block, e]``: slots of expert ``e`` in this block."""
        block = tl.program_id(0)
        _, _, one_hot = _one_hot(index_ptr, block, S, E_PAD, BLOCK)
        tl.store(table_ptr + block * E_PAD + tl.arange(0, E_PAD), tl.sum(one_hot, axis=0))

    @triton.jit
    def _place_kernel(
        index_ptr, table_ptr, order_ptr, row_ptr, token_ptr, counts_ptr, ends_ptr, S, BLOCKS,
        TOP_K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
        BLOCKS_PAD: tl.constexpr,
    ):  # fmt: skip
        """Each slot of this block to its sorted row (see the module note)."""
        block = tl.program_id(0)
        experts = tl.arange(0, E_PAD)
        blocks = tl.arange(0, BLOCKS_PAD)
        table = tl.load(table_ptr + blocks[:, None] * E_PAD + experts[None, :],
                        mask=(blocks < BLOCKS)[:, None], other=0)  # fmt: skip
        counts = tl.sum(table, axis=0)
        ends = tl.cumsum(counts, axis=0)
        earlier = tl.sum(tl.where((blocks < block)[:, None], table, 0), axis=0)
        first_row = ends - counts + earlier  # this block's first row of each expert
        if block == 0:
            tl.store(counts_ptr + experts, counts.to(tl.int64), mask=experts < E)
            tl.store(ends_ptr + experts, ends, mask=experts < E)
        slots, in_range, one_hot = _one_hot(index_ptr, block, S, E_PAD, BLOCK)
        rank = tl.cumsum(one_hot, axis=0)  # 1 for the block's first slot of its expert
        rows = tl.sum(one_hot * (first_row[None, :] + rank - 1), axis=1).to(tl.int64)
        slots64 = slots.to(tl.int64)
        tl.store(order_ptr + rows, slots64, mask=in_range)
        tl.store(token_ptr + rows, slots64 // TOP_K, mask=in_range)
        tl.store(row_ptr + slots64, rows, mask=in_range)


def fits(index: torch.Tensor, num_experts: int) -> bool:
    """Whether the kernels take this plan: Triton runs on ``index`` (``[S]`` expert ids), the
    experts are few and the slots at most :data:`MAX_BLOCKS` blocks."""
    if not (ENABLED and 0 < num_experts <= MAX_EXPERTS and use_triton(index)):
        return False
    return 0 < index.numel() <= MAX_BLOCKS * _tile(num_experts)[1]


def _tile(num_experts: int) -> tuple[int, int]:
    """``(E_PAD, BLOCK)``: the one-hot tile's experts (a power of two) and slots."""
    e_pad = max(2, triton.next_power_of_2(num_experts))
    return e_pad, TILE // e_pad


def expert_plan_launch(
    flat: torch.Tensor, num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counting sort of ``flat`` (``[S]`` expert ids in ``[0, num_experts)``), two launches.

    Returns:
        ``(order, counts, ends, row_of_slot, token_rows)``: ``[S]`` int64 slots in sorted order,
        ``[E]`` int64 counts, ``[E]`` int32 inclusive cumulative counts, ``[S]`` int64 inverse of
        ``order``, ``[S]`` int64 ``order // top_k`` (the token of each sorted row).
    """
    slots, device = flat.shape[0], flat.device
    order = torch.empty(slots, dtype=torch.int64, device=device)
    row_of_slot = torch.empty_like(order)
    token_rows = torch.empty_like(order)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    e_pad, block = _tile(num_experts)
    blocks = triton.cdiv(slots, block)
    table = torch.empty(blocks, e_pad, dtype=torch.int32, device=device)
    _block_counts_kernel[(blocks,)](flat, table, slots, E_PAD=e_pad, BLOCK=block, num_warps=8)
    _place_kernel[(blocks,)](
        flat, table, order, row_of_slot, token_rows, counts, ends, slots, blocks,
        TOP_K=top_k, E=num_experts, E_PAD=e_pad, BLOCK=block,
        BLOCKS_PAD=max(2, triton.next_power_of_2(blocks)), num_warps=8,
    )  # fmt: skip
    return order, counts, ends, row_of_slot, token_rows
