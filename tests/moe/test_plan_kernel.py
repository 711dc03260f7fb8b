"""The one-launch expert plan (:mod:`turbotune.moe.plan_kernel`) against the eager sort.

Every field must be identical (a stable sort: ties keep slot order), across block boundaries
(slots spanning several of the kernel's blocks, a tail block), skewed routing (one expert with
most slots, experts with none), ``k`` of 1 to 3, one expert, and the experts-per-tile limits.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_compiles
from tests.moe.tiny import routing

from turbotune.moe import plan_kernel
from turbotune.moe.plan import plan_experts, plan_experts_reference


def _check(index: torch.Tensor, experts: int) -> None:
    got, want = plan_experts(index, experts), plan_experts_reference(index, experts)
    assert got.token_rows is not None, "the kernel did not run"
    for name in ("order", "counts", "ends", "row_of_slot"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} vs {w.dtype}"
        mismatch = (g != w).nonzero()
        assert mismatch.numel() == 0, (
            f"{name}: {mismatch.shape[0]} entries differ, first at {mismatch[:3].tolist()}"
        )
    assert torch.equal(got.tokens, want.order // want.top_k)
    assert got.top_k == want.top_k


@pytest.mark.parametrize(("tokens", "experts", "k", "skew"), [
    (1, 1, 1, False),        # one slot, one expert
    (37, 8, 2, True),        # one block, a tail, an empty expert
    (700, 8, 2, False),      # 1400 slots over blocks of 1024: a full block and a tail
    (1100, 16, 3, True),     # 3300 slots over blocks of 512, experts 0 crowded, 15 empty
    (513, 5, 1, False),      # k = 1, experts not a power of two
    (300, 3, 3, True),       # every expert chosen by most tokens
])  # fmt: skip
def test_plan_kernel_matches_the_stable_sort(tokens, experts, k, skew) -> None:
    _check(routing(tokens, experts, k, seed=tokens + experts, skew=skew), experts)


def test_all_slots_one_expert() -> None:
    """Every slot to expert 2 of 4: the others count zero and end where it ends."""
    index = torch.full((600, 1), 2, dtype=torch.int64)
    _check(index, 4)


def test_many_experts_keep_the_eager_sort() -> None:
    """Past :data:`MAX_EXPERTS` the eager sort runs (no token rows written)."""
    experts = plan_kernel.MAX_EXPERTS + 1
    index = routing(40, experts, 2, seed=3, skew=False)
    plan = plan_experts(index, experts)
    assert plan.token_rows is None
    assert torch.equal(plan.order, plan_experts_reference(index, experts).order)


def test_block_limit(monkeypatch) -> None:
    """Past :data:`MAX_BLOCKS` blocks of slots the eager sort runs; at the limit, the kernels."""
    monkeypatch.setattr(plan_kernel, "MAX_BLOCKS", 2)  # 2 blocks of 1024 slots over 8 experts
    assert plan_kernel.fits(torch.zeros(2048, dtype=torch.int64), 8)
    assert not plan_kernel.fits(torch.zeros(2049, dtype=torch.int64), 8)
    assert not plan_kernel.fits(torch.zeros(0, dtype=torch.int64), 8)
    index = routing(1100, 8, 2, seed=5, skew=True)  # 2200 slots: 3 blocks
    assert plan_experts(index, 8).token_rows is None
    _check(routing(1000, 8, 2, seed=5, skew=True), 8)  # 2000 slots: 2 blocks


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turbotune.moe import plan_kernel as pk

def build(fn, pointers, constexprs):
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32")
                 for n in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})

pointers = {"index_ptr": "*i64", "table_ptr": "*i32", "order_ptr": "*i64", "row_ptr": "*i64",
            "token_ptr": "*i64", "counts_ptr": "*i64", "ends_ptr": "*i32"}
for experts, top_k, blocks in ((8, 2, 16), (16, 1, 256), (3, 3, 2)):
    e_pad = max(2, triton.next_power_of_2(experts))
    block = pk.TILE // e_pad
    build(pk._block_counts_kernel, pointers, {"E_PAD": e_pad, "BLOCK": block})
    build(pk._place_kernel, pointers, {"TOP_K": top_k, "E": experts, "E_PAD": e_pad,
                                       "BLOCK": block, "BLOCKS_PAD": blocks})
print("ok")
"""


@pytest.mark.slow
def test_plan_kernel_compiles_for_sm90() -> None:
    """The interpreter accepts code the compiler rejects: compile for an H100 (no GPU needed)."""
    assert_compiles(COMPILE)
