"""The GPTQ algorithm on one layer: better than round-to-nearest, every option, codes in range."""

from __future__ import annotations

import pytest
import torch

from turbotune.quant.gptq import GPTQSpec, HessianAccumulator, gptq_quantize, rtn_quantize


def correlated_inputs(n: int, width: int, rank: int = 24, seed: int = 0) -> torch.Tensor:
    """Activations on a low-rank subspace plus noise, with a few loud channels: what LLM layer
    inputs look like, and where GPTQ's error feedback has something to exploit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, width, generator=g)
    x = x + 0.1 * torch.randn(n, width, generator=g)
    x[:, :: max(1, width // 8)] *= 6.0  # outlier channels
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(97):  # uneven chunks: the running mean must not depend on them
        acc.add(chunk)
    return acc.hessian


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return ((w - q) @ x.t()).norm().item()


SPECS = [
    GPTQSpec(bits=4, group_size=128),
    GPTQSpec(bits=4, group_size=128, desc_act=True),
    GPTQSpec(bits=4, group_size=32, sym=False),
    GPTQSpec(bits=4, group_size=64, sym=False, desc_act=True),
    GPTQSpec(bits=3, group_size=-1),
    GPTQSpec(bits=2, group_size=64, sym=False),
    GPTQSpec(bits=8, group_size=128, desc_act=True),
]


def test_hessian_is_twice_the_mean_outer_product():
    x = correlated_inputs(500, 40)
    expected = 2.0 * x.t() @ x / x.shape[0]
    h = hessian_of(x)
    diff = (h - expected).abs()
    assert torch.allclose(h, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item()), (
        f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"
    )


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_gptq_beats_rtn_and_codes_are_in_range(spec):
    torch.manual_seed(0)
    out, width = 48, 200  # not a multiple of the group or block size
    x = correlated_inputs(1024, width)
    w = torch.randn(out, width)
    q, deq = gptq_quantize(w, hessian_of(x), spec)
    _, rtn = rtn_quantize(w, spec)
    gptq_err, rtn_err = output_error(w, deq, x), output_error(w, rtn, x)
    # GPTQ minimises exactly this error; on correlated inputs it wins by a wide margin
    # (measured 3.8x-9.2x here); ask for 2x so the test holds for every option.
    assert gptq_err < rtn_err / 2, f"GPTQ {gptq_err:.1f} vs RTN {rtn_err:.1f}"
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (out, width)
    assert int(q.codes.max()) <= spec.maxq
    assert int(q.zeros.min()) >= 1 and int(q.zeros.max()) <= spec.maxq  # v1-representable
    if spec.sym:
        assert (q.zeros == 2 ** (spec.bits - 1)).all()
    groups = 1 if spec.group_size == -1 else -(-width // spec.group_size)
    assert q.scales.shape == (groups, out) and q.scales.dtype == torch.float16
    assert q.g_idx.dtype == torch.int32 and q.g_idx.shape == (width,)
    # the codes, scales and zeros stand for exactly the weight GPTQ compensated for
    diff = (q.dequantize() - deq).abs()
    assert diff.max() == 0, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_act_order_groups_follow_the_hessian_diagonal():
    torch.manual_seed(0)
    x = correlated_inputs(512, 96)
    h = hessian_of(x)
    spec = GPTQSpec(bits=4, group_size=32, desc_act=True)
    q, _ = gptq_quantize(torch.randn(16, 96), h, spec)
    order = torch.argsort(torch.diagonal(h), descending=True)
    # the 32 most activated columns form group 0, the next 32 group 1, ...
    expected = torch.empty(96, dtype=torch.int32)
    expected[order] = torch.arange(96, dtype=torch.int32) // 32
    assert torch.equal(q.g_idx, expected)
    assert sorted(torch.bincount(q.g_idx).tolist()) == [32, 32, 32]
    plain, _ = gptq_quantize(torch.randn(16, 96), h, GPTQSpec(bits=4, group_size=32))
    assert torch.equal(plain.g_idx, torch.arange(96, dtype=torch.int32) // 32)


def test_act_order_helps_when_a_few_channels_dominate():
    torch.manual_seed(1)
    x = correlated_inputs(1024, 256)
    w = torch.randn(64, 256)
    h = hessian_of(x)
    errs = {
        act: output_error(w, gptq_quantize(w, h, GPTQSpec(bits=3, desc_act=act))[1], x)
        for act in (False, True)
    }
    assert errs[True] < errs[False], errs


def test_asymmetric_fits_a_shifted_weight_better_than_symmetric():
    torch.manual_seed(0)
    w = torch.rand(32, 128) + 0.2  # all positive: half the symmetric grid is wasted
    err = {
        sym: (rtn_quantize(w, GPTQSpec(bits=4, sym=sym))[1] - w).norm().item()
        for sym in (True, False)
    }
    assert err[False] < err[True] / 1.5, err


def test_dead_columns_are_zeroed_and_do_not_break_the_factorisation():
    torch.manual_seed(0)
    x = correlated_inputs(256, 64)
    x[:, [3, 17]] = 0.0  # channels that never fire
    _, deq = gptq_quantize(torch.randn(8, 64), hessian_of(x), GPTQSpec(bits=4, group_size=32))
    assert torch.isfinite(deq).all()
    assert (deq[:, [3, 17]] == 0).all()


def test_all_zero_group_quantizes_to_zero():
    w = torch.zeros(4, 64)
    w[:, 32:] = torch.randn(4, 32)
    for sym in (True, False):
        q, deq = rtn_quantize(w, GPTQSpec(bits=4, group_size=32, sym=sym))
        assert (deq[:, :32] == 0).all() and torch.isfinite(q.scales.float()).all()


def test_bad_specs_are_refused():
    for kwargs in ({"bits": 5}, {"group_size": 0}, {"percdamp": 0.0}):
        with pytest.raises(ValueError):
            GPTQSpec(**kwargs)
