"""Activation checkpointing with the fused LoRA ops (ops/lora_stash.py): the recomputed forward
leaves its dequantized weights to its own backward, so a 4-bit weight is dequantized twice per
step (forward, recomputation) instead of three times, and the gradients are those of the run
without checkpointing."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from turbotune.ops import lora_stash
from turbotune.ops.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv
from turbotune.quant import weights

HIDDEN, KV, INTER, R, TOKENS = 64, 32, 130, 4, 11  # inter >= 2 hidden: down is "wide"


def _nf4(out_f: int, in_f: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    return bnb.nn.Params4bit(w, quant_type="nf4", quant_storage=torch.uint8).to(device)


SHAPES = {
    "q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
    "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER),
}  # fmt: skip


def _params(dropout: float, device: str = "cpu") -> tuple[dict, dict]:
    bases = {n: _nf4(*s, seed=i, device=device) for i, (n, s) in enumerate(SHAPES.items())}
    gen = torch.Generator().manual_seed(50)
    adapters = {}
    for n, (o, i) in SHAPES.items():
        a = (torch.randn(R, i, generator=gen) / i**0.5).to(device).requires_grad_()
        b = (torch.randn(o, R, generator=gen) / R**0.5).to(device).requires_grad_()
        adapters[n] = LoRAWeights(a, b, 2.0, dropout)
    return bases, adapters


def _block(x: torch.Tensor, bases: dict, ads: dict) -> torch.Tensor:
    """An attention-like and an MLP-like part: q/k/v (folded or stacked), a lone o, gate/up,
    and a wide down projection."""
    q, k, v = lora_qkv(x, *[(bases[n], ads[n]) for n in ("q", "k", "v")])
    y = x + lora_linear(q * torch.cat([k, v], -1), bases["o"], ads["o"])
    return y + lora_mlp(y, *[(bases[n], ads[n]) for n in ("gate", "up", "down")])


def _run(bases, ads, mode: str, dtype=torch.float32) -> tuple[list[torch.Tensor], int]:
    """Gradients of x and every adapter, and the number of 4-bit dequantizations."""
    for ad in ads.values():
        ad.A.grad = ad.B.grad = None
    torch.manual_seed(0)
    device = ads["q"].A.device
    x = torch.randn(TOKENS, HIDDEN).to(device, dtype).requires_grad_()
    torch.manual_seed(1)  # the dropout seeds: the recomputation restores this RNG state
    if mode == "plain":
        out = _block(x, bases, ads)
    else:
        out = checkpoint(_block, x, bases, ads, use_reentrant=mode == "reentrant")
    before = _run.calls
    out.square().sum().backward()
    grads = [x.grad] + [g for ad in ads.values() for g in (ad.A.grad, ad.B.grad)]
    return grads, _run.calls - before


_run.calls = 0


def _count_dequantizations(monkeypatch) -> None:
    """Count every NF4 dequantization in ``_run.calls``; the stash on and empty."""
    real = weights.dequantize_nf4

    def dequantize(*args, **kwargs):
        _run.calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "dequantize_nf4", dequantize)
    monkeypatch.setattr(lora_stash, "ENABLED", True)
    lora_stash.clear()


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager dequantization: fast, and counted here
    _count_dequantizations(monkeypatch)
    yield
    lora_stash.clear()


def _assert_same(got: list, want: list, what: str, rtol: float = 1e-5) -> None:
    """``rtol`` relative to the largest gradient value: fp32 compute on CPU differs only by
    summation order; bf16 compute (the GPU test) differs because the wide projection's dx sums
    in another order with the kept weight (dy W + g A instead of [dy | g] [W; A]): up to one
    bf16 rounding of the largest value (2^-7 = 7.8e-3 relative), whatever the gradients' dtype."""
    for j, (g, w) in enumerate(zip(got, want)):
        diff = (g.float() - w.float()).abs()
        assert diff.max().item() <= rtol * max(1.0, w.abs().max().item()), (
            f"{what}: gradient {j} max abs diff {diff.max().item():.3e}, mean {diff.mean():.3e}"
        )


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["folded", "dropout"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_backward_reuses_the_recomputed_weights(counted, monkeypatch, dropout, mode):
    bases, ads = _params(dropout)
    # Counted from the backward call: without checkpointing, the backward dequantizes each of
    # the 7 weights once; with it, the recomputation dequantizes them and the backward reuses.
    want, plain_calls = _run(bases, ads, "plain")
    assert plain_calls == 7
    got, calls = _run(bases, ads, mode)
    _assert_same(got, want, f"{mode} checkpoint")
    assert calls == 7, f"{calls} dequantizations in the backward pass (recomputation + backward)"
    assert not lora_stash._STASH, "every kept weight is taken by its backward"

    monkeypatch.setattr(lora_stash, "ENABLED", False)  # the behaviour without the hand-over
    off, calls_off = _run(bases, ads, mode)
    _assert_same(off, want, f"{mode} checkpoint without the stash")
    assert calls_off == 14


def test_nothing_is_kept_outside_a_backward(counted):
    bases, ads = _params(0.0)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    _block(x, bases, ads).sum().backward()
    assert not lora_stash._STASH and not lora_stash.recomputing()


def test_a_changed_adapter_is_not_served_a_stale_fold(counted):
    """The folded weight holds s B: after B changes in place, the stash entry is refused."""
    bases, ads = _params(0.0)
    group = [(bases[n], ads[n]) for n in ("q", "k", "v")]

    class Recompute(torch.autograd.Function):  # runs its forward inside a backward pass
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            with torch.enable_grad():
                lora_qkv(torch.randn(3, HIDDEN), *group)
            return g

    Recompute.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert len(lora_stash._STASH) == 1
    from turbotune.ops.lora import _slots

    meta = tuple((bases[n], 2.0, 0.0, 0) for n in ("q", "k", "v"))
    slots = _slots(meta, tuple(t for n in ("q", "k", "v") for t in (ads[n].A, ads[n].B, None)))
    assert lora_stash.holds("folded", slots, torch.float32)
    with torch.no_grad():
        ads["k"].B.mul_(2.0)
    assert lora_stash.take("folded", slots, torch.float32) is None
    assert not lora_stash._STASH


@pytest.mark.gpu
def test_checkpointed_backward_reuses_the_recomputed_weights_gpu(monkeypatch):
    """The same hand-over with the Triton dequantizer and cuBLAS, bf16 compute."""
    _count_dequantizations(monkeypatch)
    bases, ads = _params(0.0, device="cuda")
    want, plain_calls = _run(bases, ads, "plain", torch.bfloat16)
    got, calls = _run(bases, ads, "non-reentrant", torch.bfloat16)
    _assert_same(got, want, "non-reentrant checkpoint (GPU)", rtol=1e-2)
    assert (plain_calls, calls) == (7, 7) and not lora_stash._STASH
