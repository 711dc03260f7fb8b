"""GPTQ checkpoint layout: hand-computed words, pack/unpack round trips, dequantization."""

from __future__ import annotations

import pytest
import torch

from turbotune.quant.gptq_format import (
    GPTQ_BITS,
    check_gptq_shapes,
    default_g_idx,
    dequantize_gptq,
    n_groups,
    pack_gptq,
    pack_int32,
    unpack_gptq,
    unpack_int32,
)


def _u32(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.flatten().tolist()]


def test_known_words():
    """Bit positions fixed by AutoGPTQ's packer: code j of a column at bit ``bits * j``."""
    assert _u32(pack_int32(torch.arange(8).view(8, 1), 4, 0)) == [0x76543210]
    assert _u32(pack_int32(torch.tensor([[1], [2], [3], [255]]), 8, 0)) == [0xFF030201]
    assert _u32(pack_int32(torch.tensor([[3]] + [[0]] * 15), 2, 0)) == [0x3]
    # 3 bits: code 10 straddles words 0/1 (2 low bits at 30..31, 1 high bit at word 1 bit 0),
    # code 21 words 1/2 (bit 31, then 2 bits at 0..1), code 31 sits at word 2 bits 29..31.
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10], codes[21], codes[31], codes[11] = 7, 6, 5, 1
    assert _u32(pack_int32(codes, 3, 0)) == [0xC0000000, 0x1 | 0x2, 0x3 | 0xA0000000]
    # packing along dim 1 (qzeros) is the same stream, row by row
    assert _u32(pack_int32(torch.arange(8).view(1, 8), 4, 1)) == [0x76543210]


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_round_trip(bits, dim):
    torch.manual_seed(bits)
    n = 96 if bits == 3 else 3 * 32 // bits
    codes = torch.randint(0, 1 << bits, (n, 7) if dim == 0 else (7, n))
    packed = pack_int32(codes, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == n * bits // 32
    assert torch.equal(unpack_int32(packed, bits, dim, n), codes)


def _act_order_g_idx(in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """g_idx as act-order writes it: groups formed in a permuted column order."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = default_g_idx(in_features, group_size)
    return g_idx


def _random_layer(out_f, in_f, bits, group_size, act_order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = n_groups(in_f, group_size)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    z = torch.randint(0, 1 << bits, (groups, out_f), generator=gen)  # includes z = 0 and maxq
    s = (torch.rand(groups, out_f, generator=gen) + 0.1).half()
    g = _act_order_g_idx(in_f, group_size, seed) if act_order else default_g_idx(in_f, group_size)
    return q, z, s, g


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("group_size", [32, 48, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_gptq_round_trip(bits, group_size, act_order):
    out_f, in_f = 64, 160 if bits != 3 else 192
    q, z, s, g = _random_layer(out_f, in_f, bits, group_size, act_order, seed=bits)
    packed = pack_gptq(q, z, s, g, bits)
    groups = n_groups(in_f, group_size)
    assert packed.qweight.shape == (in_f * bits // 32, out_f)
    assert packed.qzeros.shape == (groups, out_f * bits // 32)
    assert packed.scales.dtype == torch.float16 and packed.g_idx.dtype == torch.int32
    assert check_gptq_shapes(*packed, bits) == (out_f, in_f)
    q2, z2 = unpack_gptq(packed.qweight, packed.qzeros, bits)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    # dequantization, written column by column from the definition
    dense = dequantize_gptq(*packed, bits, dtype=torch.float32)
    expected = torch.stack(
        [s[g[c]].float() * (q[:, c] - z[g[c]]).float() for c in range(in_f)], dim=1
    )
    diff = (dense - expected).abs()
    assert torch.equal(dense, expected), f"max {diff.max():.3g} mean {diff.mean():.3g}"


def test_v1_zero_offset_and_symmetric_words():
    """Symmetric 4-bit (z = 8) is stored as 7 in every nibble: the ecosystem's 0x77777777."""
    out_f, in_f = 16, 64
    q = torch.randint(0, 16, (out_f, in_f))
    z = torch.full((2, out_f), 8)
    packed = pack_gptq(q, z, torch.ones(2, out_f), default_g_idx(in_f, 32), 4)
    assert set(_u32(packed.qzeros)) == {0x77777777}
    # and a 0 code with z = 8 dequantizes to -8 * scale
    q[:, 0] = 0
    packed = pack_gptq(q, z, torch.full((2, out_f), 0.5), default_g_idx(in_f, 32), 4)
    assert torch.all(dequantize_gptq(*packed, 4)[:, 0] == -4.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_recovers_weight(bits):
    """Quantize a real-valued weight by RTN, pack, dequantize: error within half a step."""
    torch.manual_seed(0)
    out_f, in_f, group = 24, 128, 32
    w = torch.randn(out_f, in_f)
    wg = w.view(out_f, in_f // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    # the fp16-rounded scale, as stored: otherwise its rounding (x255 codes at 8 bits) adds error
    scale = ((hi - lo) / ((1 << bits) - 1)).half().float()
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    packed = pack_gptq(
        q.view(out_f, in_f).long(), zero.t().long(), scale.t(), default_g_idx(in_f, group), bits
    )
    err = (dequantize_gptq(*packed, bits, dtype=torch.float32) - w).abs()
    step = packed.scales.float().t().repeat_interleave(group, dim=1)
    # Half a step, except where the rounded zero point pushed a group's extreme one code past
    # the grid and the clamp cut it (at most one step, and rare).
    beyond = (err > step * 0.5 * (1 + 1e-3)).float().mean()
    assert torch.all(err <= step * (1 + 1e-3)) and beyond < 0.01, (
        f"max err {err.max():.3g} (step {step.max():.3g}), {beyond:.2%} beyond half a step"
    )


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_int32(torch.zeros(32, 1, dtype=torch.long), 5, 0)
    with pytest.raises(ValueError, match="multiple"):
        pack_int32(torch.zeros(12, 1, dtype=torch.long), 4, 0)
    with pytest.raises(ValueError, match="lie in"):
        pack_int32(torch.full((8, 1), 16), 4, 0)
    q, z, s, g = _random_layer(16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="g_idx values"):
        pack_gptq(q, z, s, g + 1, 4)
    packed = pack_gptq(q, z, s, g, 4)
    with pytest.raises(ValueError, match="scales"):
        check_gptq_shapes(packed.qweight, packed.qzeros, packed.scales[:, :8], packed.g_idx, 4)
