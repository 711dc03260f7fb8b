"""The adapter block of a folded LoRA weight in one kernel (ops/lora_fold_tail.py): bitwise equal
to the torch code it replaced, over every element of the block, and nothing outside it touched."""

from __future__ import annotations

import pytest
import torch

from turbotune.ops import lora_fold_tail
from turbotune.ops.lora_fold_tail import write_adapter_block
from turbotune.ops.lora_group import Layout, Slot

N_IN, EXTRA = 24, 5  # columns of the wide buffer left and right of the block
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _old_block(b_part: torch.Tensor, slots: list[Slot], layout: Layout) -> None:
    """The code ``_folded_weight`` ran before the kernel (copied verbatim: the reference)."""
    b_part.zero_()
    for k, i in enumerate(layout.adapters):
        (start, stop), (r0, r1) = layout.rows[i], layout.ranks[k]
        # the cast to the compute dtype and the scaling in one kernel
        torch.mul(slots[i].B, slots[i].scaling, out=b_part[start:stop].narrow(1, r0, r1 - r0))


def _b(out_f: int, r: int, dtype: torch.dtype, strided: str, gen: torch.Generator) -> torch.Tensor:
    """``[out_f, r]``; some fp32 entries sit exactly halfway between two bf16 values (ties)."""
    b = torch.randn(out_f, r, generator=gen) * 3.0
    bits = b.view(torch.int32)
    ties = torch.rand(out_f, r, generator=gen) < 0.3
    b = torch.where(ties, ((bits & ~0xFFFF) | 0x8000).view(torch.float32), b)
    b = b.to(dtype)
    if strided == "transposed":  # column stride out_f, row stride 1
        return b.t().contiguous().t()
    if strided == "sliced":  # row stride r + 3, column stride 2
        wide = torch.zeros(out_f, 2 * (r + 3), dtype=dtype)
        wide[:, : 2 * r : 2] = b
        return wide[:, : 2 * r : 2]
    return b


def _group(outs, ranks, adapters, b_dtype, scaling, strided="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    spans, start = [], 0
    for o in outs:
        spans.append((start, start + o))
        start += o
    rank_spans, r0 = [], 0
    for r in ranks:
        rank_spans.append((r0, r0 + r))
        r0 += r
    slots, k = [], 0
    for i, o in enumerate(outs):
        b = None
        if i in adapters:
            b = _b(o, ranks[k], b_dtype, strided, gen).requires_grad_()
            k += 1
        slots.append(Slot(None, None, b, None, scaling * (1 + i), 0.0, 0))
    layout = Layout(tuple(spans), True, tuple(adapters), tuple(rank_spans), True, True, False)
    return slots, layout


# (outs, ranks of the adapters, projections with an adapter, scaling)
LAYOUTS = {
    "qkv": ((64, 16, 16), (4, 4, 4), (0, 1, 2), 2.0),
    "qkv-rank5": ((64, 16, 16), (5, 5, 5), (0, 1, 2), 16 / 3),  # 15 -> 16: a padding column
    "gate-up": ((96, 96), (8, 8), (0, 1), 0.3),  # no padding
    "gate-up-rank3": ((70, 70), (3, 3), (0, 1), 1.0),
    "k-missing": ((64, 16, 16), (3, 6), (0, 2), 16 / 3),  # middle rows zero, 9 -> 16 columns
    "four": ((40, 24, 24, 8), (2, 6, 3, 5), (0, 1, 2, 3), 0.7),  # every pointer slot
    "five": ((8, 8, 8, 8, 8), (1, 2, 3, 4, 5), (0, 1, 2, 3, 4), 0.7),  # eager fallback
}


def _buffers(layout: Layout, dtype: torch.dtype, device: torch.device):
    """Two identical garbage-filled wide buffers and the block's column range in them."""
    padded = -(-layout.ranks[-1][1] // 8) * 8
    rows = layout.rows[-1][1]
    gen = torch.Generator().manual_seed(7)
    wide = (torch.randn(rows, N_IN + padded + EXTRA, generator=gen) * 1e3).to(dtype)
    wide[::3, N_IN::2] = float("nan")
    return wide.to(device), wide.clone().to(device), padded


def _assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    same = got.view(_BITS[got.dtype]) == want.view(_BITS[want.dtype])
    if not bool(same.all()):
        diff = (got.float() - want.float()).abs().nan_to_num(float("inf"))
        where = tuple(int(i) for i in (~same).nonzero()[0])
        pytest.fail(
            f"{what}: {int((~same).sum())} of {same.numel()} elements differ bitwise, first at "
            f"{where}; max abs diff {diff.max().item():.3e}, mean abs diff "
            f"{diff.mean().item():.3e}"
        )


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_bitwise_equals_old_code(name, b_dtype, out_dtype, device, monkeypatch):
    outs, ranks, adapters, scaling = LAYOUTS[name]
    slots, layout = _group(outs, ranks, adapters, b_dtype, scaling)
    slots = [s._replace(B=None if s.B is None else s.B.to(device)) for s in slots]
    ours, ref, padded = _buffers(layout, out_dtype, device)
    launches = []
    kernel = lora_fold_tail._adapter_block_kernel

    class _Counted:  # counts launches, runs the real kernel
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(lora_fold_tail, "_adapter_block_kernel", _Counted())
    with torch.no_grad():  # as inside the autograd functions that build W_aug
        write_adapter_block(ours.narrow(1, N_IN, padded), slots, layout)
        _old_block(ref.narrow(1, N_IN, padded), slots, layout)
    want_launches = 1 if len(adapters) <= lora_fold_tail.MAX_ADAPTERS else 0
    assert len(launches) == want_launches, f"{len(launches)} kernel launches"
    _assert_bitwise(ours[:, N_IN : N_IN + padded], ref[:, N_IN : N_IN + padded], "block")
    _assert_bitwise(ours, ref, "whole buffer (columns outside the block must stay untouched)")
    assert not ours[:, N_IN : N_IN + padded].isnan().any(), "garbage left in the block"


@pytest.mark.parametrize("strided", ["transposed", "sliced"])
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
def test_strided_b(strided, b_dtype, device):
    slots, layout = _group((64, 16, 16), (5, 5, 5), (0, 1, 2), b_dtype, 16 / 3, strided)
    assert not slots[0].B.is_contiguous()
    slots = [s._replace(B=s.B.to(device)) for s in slots]  # .to keeps the strides
    ours, ref, padded = _buffers(layout, torch.bfloat16, device)
    with torch.no_grad():
        write_adapter_block(ours.narrow(1, N_IN, padded), slots, layout)
        _old_block(ref.narrow(1, N_IN, padded), slots, layout)
    _assert_bitwise(ours, ref, f"{strided} B")


@pytest.mark.gpu
def test_cuda_graph_replay_reads_current_b():
    """Captured in a CUDA graph, a replay writes the block from B's values at replay time."""
    device = torch.device("cuda")
    slots, layout = _group((4096, 1024, 1024), (16, 16, 16), (0, 1, 2), torch.float32, 2.0)
    slots = [s._replace(B=s.B.detach().to(device)) for s in slots]
    ours, ref, padded = _buffers(layout, torch.bfloat16, device)
    block = ours.narrow(1, N_IN, padded)
    write_adapter_block(block, slots, layout)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_adapter_block(block, slots, layout)
    for s in slots:
        s.B.mul_(-1.5)
    ours[:, N_IN:].fill_(float("nan"))
    ref[:, N_IN:].fill_(float("nan"))
    graph.replay()
    _old_block(ref.narrow(1, N_IN, padded), slots, layout)
    torch.cuda.synchronize()
    _assert_bitwise(ours, ref, "replayed block")
