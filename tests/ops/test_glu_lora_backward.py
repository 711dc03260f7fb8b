"""ops/glu_lora_backward: ``de``, ``du`` and ``dA = g^T h`` from one pass, against the eager
reference (``reference.glu_backward_with_h`` then ``g^T h``) in fp32, and the whole LoRA MLP with
the fast path vs without it (``ENABLED = False``: the activation backward writes ``h``, an ``mm``
reads it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from turbotune.ops import glu_lora_backward as fused
from turbotune.ops import reference
from turbotune.ops._triton import HAS_TRITON
from turbotune.ops.lora import LoRAWeights, lora_mlp

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(m: int, i: int, r: int, device, seed: int = 0):
    """fp32 ``dh`` ``[M, I]``, ``[e | u]`` ``[M, 2I]`` and a wider ``[M, r + 3]`` buffer whose
    first ``r`` columns are ``g`` (strided, as the wide layout's ``[dy | g]`` column view),
    all rounded to bf16 so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    dh, eu = torch.randn(m, i, generator=gen), 2.0 * torch.randn(m, 2 * i, generator=gen)
    g_wide = torch.randn(m, r + 3, generator=gen)
    return [t.bfloat16().float().to(device) for t in (dh, eu, g_wide)]


def _old_path(dh, eu, g, activation):
    """The eager reference in the inputs' dtype: ``(de, du, dA)``, ``h`` rounded, ``dA`` by mm."""
    i = dh.shape[1]
    de, du, h = reference.glu_backward_with_h(dh, eu[:, :i], eu[:, i:], activation)
    return de, du, torch.mm(g.t(), h)  # in the inputs' dtype, as the old path


def _assert_close(name, got, want, eager, device, slack=2.0, floor=1e-5):
    """Error vs fp32 <= slack x the eager low-precision error + a floor + one ulp (of the eager
    run's dtype) of the largest value (a lucky eager run on tiny tensors); on the CPU
    interpreter bf16 roundings truncate (up to a whole ulp, not half of one), so slack and ulp
    double there, also for an fp32 ``dA`` summed from bf16-rounded ``h``."""
    want = want.float()
    eager_err = (eager.float() - want).abs().max().item()
    scale = want.abs().max().item()
    ulp = 0.0 if eager.dtype == torch.float32 else torch.finfo(eager.dtype).eps
    if eager.dtype == torch.bfloat16 and device.type == "cpu":
        slack, ulp = 2.0 * slack, 2.0 * ulp
    bound = slack * eager_err + floor * max(1.0, scale) + ulp * scale
    diff = (got.float() - want).abs()
    where = tuple(int(k) for k in torch.unravel_index(diff.argmax(), diff.shape))
    assert diff.max().item() <= bound, (
        f"{name}: max abs diff {diff.max().item():.3e} at {where} (bound {bound:.3e}, eager "
        f"{eager_err:.3e}), mean abs diff {diff.mean().item():.3e}, max |ref| {scale:.3e}"
    )


def _check_kernel(m, i, r, activation, dtype, out_dtype, device, config=None):
    dh32, eu32, g_wide32 = _inputs(m, i, r, device)
    want = _old_path(dh32, eu32, g_wide32[:, :r], activation)
    eager = _old_path(dh32.to(dtype), eu32.to(dtype), g_wide32[:, :r].to(dtype), activation)
    dh, eu, g_wide = dh32.to(dtype), eu32.to(dtype), g_wide32.to(dtype)
    dh_before = dh.clone()
    e, u, g = eu[:, :i], eu[:, i:], g_wide[:, :r]
    assert fused.supported(dh, e, u, g)
    d_a = fused.glu_backward_lora_da(dh, e, u, g, activation, out_dtype, config)
    assert d_a.shape == (r, i) and d_a.dtype == out_dtype
    assert torch.equal(dh, dh_before), "dh must be left as it was"
    for name, got, w, ea in zip(("de", "du", "dA"), (e, u, d_a), want, eager, strict=True):
        _assert_close(f"{name} [{m}, {i}] r {r} {activation} {dtype}", got, w, ea, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "m, i, r",
    [(1, 16, 1), (7, 100, 8), (64, 16, 64), (257, 1000, 16)],
    ids=["tiny", "prime", "rank64", "above-blocks"],
)
def test_kernel_matches_reference(device, m, i, r, activation, dtype):
    """``de``, ``du`` over ``e``, ``u`` (column views of ``[e | u]``) and ``dA`` from a strided
    ``g``, vs the fp32 reference; ``dh`` untouched."""
    if (m, i) == (257, 1000) and activation != "silu" and device.type == "cpu":
        i = 300  # the interpreter's time: still several column blocks and row ranges
    _check_kernel(m, i, r, activation, dtype, torch.float32, device)


@pytest.mark.parametrize(
    "config",
    [
        dict(split_m=1),  # dA stored by the kernel in its dtype, no partials
        dict(split_m=3, block_m=16, block_i=16),  # fp32 partials, uneven last range
        dict(split_m=100, block_i=128, num_warps=8),  # more ranges asked than row blocks
    ],
    ids=["one-range", "three-ranges", "clamped"],
)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_kernel_launch_configs(device, config, out_dtype):
    """Every launch setting the benchmark sweeps gives the same answer, into A's dtype."""
    _check_kernel(
        83, 150, 5, "silu", torch.bfloat16, out_dtype, device, fused.with_config(**config)
    )


def test_supported_rules(device):
    """The fast path is taken only as enabled, on 2-D unit-column-stride operands."""
    dh, eu, g = (t.bfloat16() for t in _inputs(8, 16, 4, device))
    e, u = eu[:, :16], eu[:, 16:]
    assert fused.supported(dh, e, u, g)
    assert not fused.supported(dh, eu[:, ::2], u, g)  # column stride 2
    assert not fused.supported(dh[:4], e, u, g)
    old = fused.ENABLED
    try:
        fused.ENABLED = False
        assert not fused.supported(dh, e, u, g)
    finally:
        fused.ENABLED = old


# ---- the whole LoRA MLP: fast path vs the old one ----


def _mlp_grads(dtype, hidden, inter, r, activation, dropout, enabled, monkeypatch, device):
    """Output and every gradient (x, A/B of gate, up, down) of one ``lora_mlp`` in ``dtype``,
    and how often the fused kernel ran."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    leaves = {"x": torch.randn(13, hidden, generator=gen)}
    for name, (o, i) in zip(("gate", "up", "down"), shapes, strict=True):
        leaves[f"A_{name}"] = torch.randn(r, i, generator=gen) / i**0.5
        leaves[f"B_{name}"] = torch.randn(o, r, generator=gen) / r**0.5
    weights = [(torch.randn(o, i, generator=gen) / i**0.5).to(device, dtype) for o, i in shapes]
    dy = torch.randn(13, hidden, generator=gen).to(device, dtype)
    leaves = {k: v.bfloat16().to(device, dtype).requires_grad_() for k, v in leaves.items()}
    calls = []
    kernel = fused.glu_backward_lora_da
    monkeypatch.setattr(fused, "ENABLED", enabled)
    monkeypatch.setattr(fused, "glu_backward_lora_da", lambda *a: calls.append(1) or kernel(*a))
    projections = [
        (w, LoRAWeights(leaves[f"A_{n}"], leaves[f"B_{n}"], 2.0, dropout))
        for w, n in zip(weights, ("gate", "up", "down"), strict=True)
    ]
    torch.manual_seed(7)  # the dropout seed
    y = lora_mlp(leaves["x"], *projections, activation=activation)
    y.backward(dy)
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}, len(calls)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_mlp_fast_path_matches_old(device, monkeypatch, activation):
    """bf16: the fast path's output and gradients are as close to the old path's fp32 result as
    the old path's bf16 run is (flash rule); fp32: the two paths agree to fp32 rounding. The
    kernel must have run once per backward (else this compares the old path with itself)."""
    torch.set_num_threads(1)
    args = (40, 70, 8, activation, 0.0)  # inter >= 16, a prime-ish hidden, rank below 16
    want, n_old = _mlp_grads(torch.float32, *args, False, monkeypatch, device)
    got32, n32 = _mlp_grads(torch.float32, *args, True, monkeypatch, device)
    eager, _ = _mlp_grads(torch.bfloat16, *args, False, monkeypatch, device)
    got, n16 = _mlp_grads(torch.bfloat16, *args, True, monkeypatch, device)
    assert (n_old, n32, n16) == (0, 1, 1)
    for name in want:
        _assert_close(f"fp32 {name}", got32[name], want[name], want[name], device, floor=1e-5)
        _assert_close(f"bf16 {name}", got[name], want[name], eager[name], device)


def test_lora_mlp_dropout_keeps_old_path(device, monkeypatch):
    """Dropout on down needs ``D(h)``: the old kernel serves it, the fused one is not called."""
    torch.set_num_threads(1)
    _, calls = _mlp_grads(torch.float32, 24, 40, 4, "silu", 0.25, True, monkeypatch, device)
    assert calls == 0


# ---- a real shape on the GPU, and the sm_90 compile check ----


@pytest.mark.gpu
def test_kernel_llama8b_shape():
    """Llama-3.1-8B's MLP backward at 4096 tokens: M 4096, I 14336, r 16, bf16 in, fp32 A."""
    _check_kernel(4096, 14336, 16, "silu", torch.bfloat16, torch.float32, torch.device("cuda"))


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from turbotune.ops.glu_lora_backward import _bwd_da_kernel as fn

    # Pointers and row strides divisible by 16, as the JIT specializes them at real shapes: the
    # row loop's loads are then pipelined through shared memory (cp.async), a second code path.
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
               if n.endswith("_ptr") or n in ("stride_em", "stride_um", "stride_dhm")}
    for dt, out in (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32")):
        sig = {n: f"*{out}" if n == "da_ptr" else f"*{dt}" for n in fn.arg_names
               if n.endswith("_ptr")}
        for act, (bm, bi, warps) in ((0, (32, 64, 4)), (1, (64, 128, 8)), (2, (16, 16, 4))):
            c = {"ACTIVATION": act, "R_PAD": 16 if act else 64, "BLOCK_M": bm, "BLOCK_I": bi,
                 "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "DOT_FP32": False}
            s = {n: "constexpr" if n in c else sig.get(n, "i32") for n in fn.arg_names}
            for attrs in (None, aligned):
                triton.compile(ASTSource(fn, s, c, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": 3})
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: compile for an H100 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
