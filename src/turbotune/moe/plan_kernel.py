"""The expert sort of :func:`~turbotune.moe.plan.plan_experts` as one Triton launch (few experts).

Design note. The eager plan is about ten launches (a stable radix sort with its copies, a
zero-fill and a ``scatter_add`` for the counts, a ``cumsum`` and its cast, an ``arange`` and an
``index_put`` for the inverse permutation, a ``floor_divide`` for the tokens), each a few
microseconds of GPU work behind 10-20 us of host work. In a layer that must wait for its row
counts on the host (the per-expert ``mm`` loop), that host time sits between the router and the
first expert product with the GPU idle. For few experts the same plan is a counting sort that one
program finishes in microseconds:

- pass 1 counts the slots of each expert over blocks of slots (a one-hot ``[BLOCK, E]`` tile
  summed over its rows);
- the exclusive scan of the counts is where each expert's rows start;
- pass 2 walks the blocks in slot order again: a slot's sorted row is its expert's running start
  plus its rank among the block's slots of that expert (an inclusive ``cumsum`` down the one-hot
  tile), so ties keep slot order, exactly the stable sort's result.

The one-hot tile is ``BLOCK x E_PAD`` with ``E_PAD`` the next power of two of the experts: worth
it while the experts are few (:data:`MAX_EXPERTS`); many experts (Qwen3-30B-A3B's 128) keep the
eager plan, whose host work is hidden there (no host read of the counts follows).
"""

from __future__ import annotations

import torch

from turbotune.ops._triton import HAS_TRITON, tl, triton, use_triton

ENABLED = True
"""Run the kernel where it fits (False: the eager sort everywhere; ``benchmarks/moe_layer.py``'s
``:eager-plan`` variant)."""
MAX_EXPERTS = 16
"""Most experts the one-program counting sort takes."""
TILE = 8192
"""One-hot elements per block (``BLOCK * E_PAD``): 32 per thread of 8 warps."""


if HAS_TRITON:

    @triton.jit
    def _expert_plan_kernel(
        index_ptr, order_ptr, row_ptr, token_ptr, counts_ptr, ends_ptr, S,
        TOP_K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Counting sort of ``S`` expert ids (one program; see the module note)."""
        experts = tl.arange(0, E_PAD)
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        for start in range(0, S, BLOCK):
            slots = start + tl.arange(0, BLOCK)
            ids = tl.load(index_ptr + slots, mask=slots < S, other=E_PAD).to(tl.int32)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        ends = tl.cumsum(counts, axis=0)
        tl.store(counts_ptr + experts, counts.to(tl.int64), mask=experts < E)
        tl.store(ends_ptr + experts, ends, mask=experts < E)
        running = ends - counts  # where each expert's next row goes
        for start in range(0, S, BLOCK):
            slots = start + tl.arange(0, BLOCK)
            in_range = slots < S
            ids = tl.load(index_ptr + slots, mask=in_range, other=E_PAD).to(tl.int32)
            one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
            rank = tl.cumsum(one_hot, axis=0)  # 1 for a block's first slot of its expert
            rows = tl.sum(one_hot * (running[None, :] + rank - 1), axis=1).to(tl.int64)
            slots64 = slots.to(tl.int64)
            tl.store(order_ptr + rows, slots64, mask=in_range)
            tl.store(token_ptr + rows, slots64 // TOP_K, mask=in_range)
            tl.store(row_ptr + slots64, rows, mask=in_range)
            running += tl.sum(one_hot, axis=0)


def fits(index: torch.Tensor, num_experts: int) -> bool:
    """Whether the kernel takes this plan: Triton runs on ``index`` and the experts are few."""
    return ENABLED and 0 < num_experts <= MAX_EXPERTS and use_triton(index)


def expert_plan_launch(
    flat: torch.Tensor, num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counting sort of ``flat`` (``[S]`` expert ids in ``[0, num_experts)``).

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
    e_pad = max(2, triton.next_power_of_2(num_experts))
    _expert_plan_kernel[(1,)](
        flat, order, row_of_slot, token_rows, counts, ends, slots,
        TOP_K=top_k, E=num_experts, E_PAD=e_pad, BLOCK=TILE // e_pad, num_warps=8,
    )  # fmt: skip
    return order, counts, ends, row_of_slot, token_rows
