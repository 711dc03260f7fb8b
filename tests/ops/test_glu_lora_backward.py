"""ops/glu_lora_backward: ``de``, ``du``, ``dA = g^T h`` and the gate/up adapters'
``dB = s de^T t`` from one pass, against the eager reference (``reference.glu_backward_with_h``,
then ``g^T h`` and ``s de^T t``) in fp32, and the whole LoRA MLP with the fast path vs without it
(``ENABLED = False``: the activation backward writes ``h``, an ``mm`` reads it; ``FUSED_DB =
False``: the gate/up group's backward computes ``dB`` by cuBLAS)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from tests.helpers import assert_compiles

from turbotune.ops import glu_lora_backward as fused
from turbotune.ops import lora as lora_ops
from turbotune.ops import lora_group, reference
from turbotune.ops._triton import HAS_TRITON
from turbotune.ops.lora import LoRAWeights, lora_mlp

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(m: int, i: int, r: int, device, seed: int = 0):
    """fp32 ``dh`` ``[M, I]``, ``[e | u]`` ``[M, 2I]`` and a wider ``[M, r + 3]`` buffer whose
    first ``r`` columns are ``g`` (strided, as the wide layout's ``[dy | g]`` column view),
    all rounded to bf16 so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    dh, eu = torch.randn(m, i, generator=gen), 2.0 * torch.randn(m, 2 * i, generator=gen)
    g_wide = torch.randn(m, r + 3, generator=gen)
    return [t.bfloat16().float().to(device) for t in (dh, eu, g_wide)]


def _old_path(dh, eu, g, activation, gate_up=None):
    """The eager reference in the inputs' dtype: ``(de, du, dA[, dB_g, dB_u])``, ``h`` rounded,
    ``dA`` by mm, ``dB`` as ``lora_group.scaled_db`` (``s de^T t`` by addmm's alpha)."""
    i = dh.shape[1]
    de, du, h = reference.glu_backward_with_h(dh, eu[:, :i], eu[:, i:], activation)
    out = (de, du, torch.mm(g.t(), h))  # in the inputs' dtype, as the old path
    if gate_up is None:
        return out
    (t_g, t_u), (s_g, s_u) = gate_up[:2], gate_up.scalings
    return (*out, s_g * torch.mm(de.t(), t_g), s_u * torch.mm(du.t(), t_u))


def _gate_up(m, r_g, r_u, device, dtype, b_dtypes=(torch.float32, torch.float32)):
    """Strided ``t_g``, ``t_u``: column views of one ``[M, 5 + r_g + r_u]`` buffer (as of the
    folded layout's ``[x | T]``), bf16-rounded values."""
    gen = torch.Generator().manual_seed(11)
    buf = torch.randn(m, 5 + r_g + r_u, generator=gen).bfloat16().to(device, dtype)
    return fused.GateUpT(buf[:, 5 : 5 + r_g], buf[:, 5 + r_g :], (2.0, 0.25), b_dtypes)


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


def _check_kernel(
    m, i, r, activation, dtype, out_dtype, device, config=None, t_ranks=None, b_dtypes=None
):
    """The kernel vs the fp32 reference; with ``t_ranks = (r_g, r_u)`` also the gate/up ``dB``
    (into ``b_dtypes``, default ``out_dtype`` for both)."""
    dh32, eu32, g_wide32 = _inputs(m, i, r, device)
    gate_up32 = gate_up = None
    if t_ranks is not None:
        b_dtypes = b_dtypes or (out_dtype, out_dtype)
        gate_up32 = _gate_up(m, *t_ranks, device, torch.float32, b_dtypes)
        gate_up = _gate_up(m, *t_ranks, device, dtype, b_dtypes)
    want = _old_path(dh32, eu32, g_wide32[:, :r], activation, gate_up32)
    eager = _old_path(
        dh32.to(dtype), eu32.to(dtype), g_wide32[:, :r].to(dtype), activation, gate_up
    )
    dh, eu, g_wide = dh32.to(dtype), eu32.to(dtype), g_wide32.to(dtype)
    dh_before = dh.clone()
    e, u, g = eu[:, :i], eu[:, i:], g_wide[:, :r]
    assert fused.supported(dh, e, u, g)
    assert gate_up is None or fused.takes_gate_up(dh, gate_up)
    out = fused.glu_backward_lora_da(dh, e, u, g, activation, out_dtype, config, gate_up)
    assert out.d_a.shape == (r, i) and out.d_a.dtype == out_dtype
    got, names = (e, u, out.d_a), ("de", "du", "dA")
    if gate_up is None:
        assert out.d_b_gate is None and out.d_b_up is None
    else:
        for d_b, rank, b_dtype in zip(out[1:], t_ranks, b_dtypes, strict=True):
            assert d_b.shape == (i, rank) and d_b.dtype == b_dtype and d_b.is_contiguous()
        got, names = (*got, *out[1:]), (*names, "dB_gate", "dB_up")
    assert torch.equal(dh, dh_before), "dh must be left as it was"
    for name, gt, w, ea in zip(names, got, want, eager, strict=True):
        _assert_close(f"{name} [{m}, {i}] r {r} {activation} {dtype}", gt, w, ea, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "m, i, r",
    [(1, 16, 1), (7, 100, 8), (64, 16, 64), (257, 1000, 16)],
    ids=["tiny", "prime", "rank64", "above-blocks"],
)
def test_kernel_matches_reference(device, m, i, r, activation, dtype):
    """``de``, ``du`` over ``e``, ``u`` (column views of ``[e | u]``), ``dA`` from a strided
    ``g`` and the gate/up ``dB`` from strided ``t`` (ranks r and r + 3: they may differ), vs
    the fp32 reference; ``dh`` untouched."""
    if (m, i) == (257, 1000) and activation != "silu" and device.type == "cpu":
        i = 300  # the interpreter's time: still several column blocks and row ranges
    _check_kernel(m, i, r, activation, dtype, torch.float32, device, t_ranks=(r, r + 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_without_gate_up(device, dtype):
    """Without ``GateUpT`` the kernel sums no ``dB`` (``HAS_DB`` off) and ``dA`` is as before."""
    _check_kernel(70, 150, 8, "gelu_tanh", dtype, torch.float32, device)


@pytest.mark.parametrize(
    "config",
    [
        dict(split_m=1),  # dA stored by the kernel in its dtype, no partials
        dict(split_m=3, block_m=16, block_i=16),  # fp32 partials, uneven last range
        dict(split_m=100, block_i=128, num_warps=8),  # more ranges asked than row blocks
    ],
    ids=["one-range", "three-ranges", "clamped"],
)
@pytest.mark.parametrize(
    "out_dtype, b_dtypes",
    [
        (torch.float32, None),
        (torch.bfloat16, None),  # one range: every result stored by the kernel in bf16
        (torch.float32, (torch.bfloat16, torch.float32)),  # mixed: fp32 buffer, cast per part
    ],
    ids=["fp32", "bf16", "mixed"],
)
def test_kernel_launch_configs(device, config, out_dtype, b_dtypes):
    """Every launch setting the benchmark sweeps gives the same answer, into A's and the Bs'
    dtypes."""
    _check_kernel(
        83, 150, 5, "silu", torch.bfloat16, out_dtype, device, fused.with_config(**config),
        t_ranks=(5, 16), b_dtypes=b_dtypes,
    )  # fmt: skip


def test_takes_gate_up_rules(device):
    """``dB`` is fused only as switched on, for ``[M, r]`` unit-column-stride ``t``."""
    dh = torch.zeros(8, 16, device=device)
    gate_up = _gate_up(8, 4, 4, device, torch.float32)
    assert fused.takes_gate_up(dh, gate_up)
    assert not fused.takes_gate_up(dh[:4], gate_up)  # rows differ
    t_strided = torch.zeros(8, 8, device=device)[:, ::2]
    assert not fused.takes_gate_up(dh, gate_up._replace(t_up=t_strided))
    old = fused.FUSED_DB
    try:
        fused.FUSED_DB = False
        assert not fused.takes_gate_up(dh, gate_up)
    finally:
        fused.FUSED_DB = old


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


_KERNEL, _GROUP_BACKWARD = fused.glu_backward_lora_da, lora_ops._projections_backward


def _mlp_grads(dtype, monkeypatch, device, *, base="direct", activation="silu", **options):
    """Output and every gradient (x, A/B of gate, up, down) of one ``lora_mlp`` in ``dtype``
    (the gate/up layout checked to be ``base``), and what ran: per fused-kernel call whether it got the gate/up ``t`` (``dB`` fused), and
    the ``needs`` the gate/up group's backward was asked for.

    Args:
        base: ``"direct"`` (weights in ``dtype``: used as stored), ``"fold"`` (fp64 weights:
            dequantized into the folded ``[W | sB]``), ``"stacked"`` (fp64, folding off: the
            shared adapters beside the stacked weight).
        options: ``hidden``, ``inter``, ``r``, ``dropouts`` (gate, up, down), ``enabled``
            (``ENABLED``), ``fused_db`` (``FUSED_DB``), ``no_adapter`` and ``frozen_b``
            (projection names).
    """
    hidden, inter, r = options.get("hidden", 40), options.get("inter", 70), options.get("r", 8)
    names = ("gate", "up", "down")
    gen = torch.Generator().manual_seed(3)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    leaves = {"x": torch.randn(13, hidden, generator=gen)}
    for name, (o, i) in zip(names, shapes, strict=True):
        leaves[f"A_{name}"] = torch.randn(r, i, generator=gen) / i**0.5
        leaves[f"B_{name}"] = torch.randn(o, r, generator=gen) / r**0.5
    w_dtype = dtype if base == "direct" else torch.float64  # same (bf16-rounded) values
    weights = [
        (torch.randn(o, i, generator=gen) / i**0.5).bfloat16().to(device, w_dtype)
        for o, i in shapes
    ]
    dy = torch.randn(13, hidden, generator=gen).to(device, dtype)
    frozen = {f"B_{n}" for n in options.get("frozen_b", ())}
    leaves = {
        k: v.bfloat16().to(device, dtype).requires_grad_(k not in frozen) for k, v in leaves.items()
    }
    calls, group_needs, layouts = [], [], []
    kernel, group_backward = _KERNEL, _GROUP_BACKWARD  # not an earlier run's spies

    def kernel_spy(*args, gate_up=None):
        calls.append(gate_up is not None)
        return kernel(*args, gate_up=gate_up)

    def group_spy(*args):
        group_needs.append(tuple(args[-1]))
        layouts.append(args[4])
        return group_backward(*args)

    monkeypatch.setattr(fused, "ENABLED", options.get("enabled", True))
    monkeypatch.setattr(fused, "FUSED_DB", options.get("fused_db", True))
    monkeypatch.setattr(fused, "glu_backward_lora_da", kernel_spy)
    monkeypatch.setattr(lora_ops, "_projections_backward", group_spy)
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", base != "stacked")
    dropouts = options.get("dropouts", (0.0, 0.0, 0.0))
    projections = [
        (w, None if n in options.get("no_adapter", ()) else
         LoRAWeights(leaves[f"A_{n}"], leaves[f"B_{n}"], 2.0 if n != "up" else 0.5, p))
        for w, n, p in zip(weights, names, dropouts, strict=True)
    ]  # fmt: skip
    torch.manual_seed(7)  # the dropout seed
    y = lora_mlp(leaves["x"], *projections, activation=activation)
    y.backward(dy)
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    layout = layouts[0]
    assert (layout.fold, layout.direct) == (base == "fold", base == "direct"), (base, layout)
    return {"y": y.detach(), **grads}, calls, group_needs


def _old_and_new(run, **old):
    """The four runs the flash rule compares, in this order: fp32 old path (the reference),
    fp32 new, bf16 old (the eager low-precision error), bf16 new; ``old`` switches the new
    path off. Each run returns ``_mlp_grads``'s (results, kernel calls, group needs)."""
    return (
        run(torch.float32, **old),
        run(torch.float32),
        run(torch.bfloat16, **old),
        run(torch.bfloat16),
    )


def _assert_all_close(got, want, eager, device, label, floor=1e-5):
    assert got.keys() == want.keys() == eager.keys(), (got.keys(), want.keys())
    for name in want:
        _assert_close(f"{label} {name}", got[name], want[name], eager[name], device, floor=floor)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_mlp_fast_path_matches_old(device, monkeypatch, activation):
    """bf16: the fast path (dA and the gate/up dB in the kernel) is as close to the old path's
    fp32 result as the old path's bf16 run is (flash rule); fp32: the two paths agree to fp32
    rounding. The kernel must have run once per backward (else this compares the old path with
    itself)."""
    torch.set_num_threads(1)
    run = lambda dtype, **kw: _mlp_grads(dtype, monkeypatch, device, activation=activation, **kw)  # noqa: E731
    (want, n_old, _), (got32, n32, _), (eager, _, _), (got, n16, _) = _old_and_new(
        run, enabled=False
    )
    assert (n_old, n32, n16) == ([], [True], [True])
    _assert_all_close(got32, want, want, device, "fp32")
    _assert_all_close(got, want, eager, device, "bf16")


@pytest.mark.parametrize("base", ["fold", "direct", "stacked"])
def test_lora_mlp_fused_db_matches_old(device, monkeypatch, base):
    """``FUSED_DB`` on vs off (the kernel runs both times, for dA) on each gate/up layout where
    the saved ``t`` is found (folded ``[x | T]``, ``T`` of the shared adapters): every gradient
    as close to the fp32 old path as the bf16 old path is; the kernel got the ``t`` and the
    group's backward was asked for no ``dB`` (so the two products are really skipped)."""
    torch.set_num_threads(1)
    run = lambda dtype, **kw: _mlp_grads(dtype, monkeypatch, device, base=base, **kw)  # noqa: E731
    (want, n_want, needs_want), (got32, n32, needs32), (eager, _, _), (got, n16, needs16) = (
        _old_and_new(run, fused_db=False)
    )
    assert (n_want, n32, n16) == ([False], [True], [True])
    assert [n.B for n in needs_want[0]] == [True, True]
    assert [n.B for n in needs32[0]] == [n.B for n in needs16[0]] == [False, False]
    _assert_all_close(got32, want, want, device, f"{base} fp32")
    _assert_all_close(got, want, eager, device, f"{base} bf16")


@pytest.mark.parametrize(
    "options",
    [
        dict(no_adapter=("up",)),
        dict(frozen_b=("gate",)),
        dict(dropouts=(0.25, 0.0, 0.0)),  # dropout on gate: adapters not shared
        dict(no_adapter=("down",)),  # no dA: the kernel does not run at all
        dict(dropouts=(0.0, 0.0, 0.25)),  # dropout on down: D(h) by the old kernel
    ],
    ids=["no-up-adapter", "frozen-gate-B", "gate-dropout", "no-down-adapter", "down-dropout"],
)
def test_lora_mlp_fused_db_falls_back(device, monkeypatch, options):
    """Where the gate/up ``dB`` cannot be fused, the kernel gets no ``t``, the group computes
    ``dB`` as before, and every gradient equals the ``FUSED_DB = False`` run bit for bit."""
    torch.set_num_threads(1)
    want, n_want, _ = _mlp_grads(torch.float32, monkeypatch, device, fused_db=False, **options)
    got, n_got, needs = _mlp_grads(torch.float32, monkeypatch, device, **options)
    assert n_got == n_want and not any(n_got)
    gate_b = "gate" not in options.get("frozen_b", ())
    up_b = "up" not in options.get("no_adapter", ())
    assert [n.B for n in needs[0]] == [gate_b, up_b]
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).abs()
        assert torch.equal(got[name], want[name]), f"{name}: max abs diff {diff.max():.3e}"


def test_lora_mlp_dropout_keeps_old_path(device, monkeypatch):
    """Dropout on down needs ``D(h)``: the old kernel serves it, the fused one is not called."""
    torch.set_num_threads(1)
    _, calls, _ = _mlp_grads(
        torch.float32, monkeypatch, device, hidden=24, inter=40, r=4, dropouts=(0.25,) * 3
    )
    assert calls == []


# ---- a real shape on the GPU, and the sm_90 compile check ----


@pytest.mark.gpu
def test_kernel_llama8b_shape():
    """Llama-3.1-8B's MLP backward at 4096 tokens: M 4096, I 14336, r 16, bf16 in, fp32 A and
    B, with the gate/up ``dB`` from strided ``t``; and without them."""
    cuda = torch.device("cuda")
    _check_kernel(4096, 14336, 16, "silu", torch.bfloat16, torch.float32, cuda, t_ranks=(16, 16))
    _check_kernel(4096, 14336, 16, "silu", torch.bfloat16, torch.float32, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["fold", "direct"])
def test_lora_mlp_fused_db_gpu(monkeypatch, base):
    """The whole MLP at a real width (hidden 4096, inter 14336, r 16, 13 tokens): FUSED_DB on vs
    off, every gradient within the flash rule, the kernel got the ``t``."""
    cuda = torch.device("cuda")
    run = lambda dtype, **kw: _mlp_grads(  # noqa: E731
        dtype, monkeypatch, cuda, base=base, hidden=4096, inter=14336, r=16, **kw
    )
    want, _, _ = run(torch.float32, fused_db=False)
    eager, _, _ = run(torch.bfloat16, fused_db=False)
    got, calls, needs = run(torch.bfloat16)
    assert calls == [True] and [n.B for n in needs[0]] == [False, False]
    _assert_all_close(got, want, eager, cuda, f"{base} bf16")


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from turbotune.ops.glu_lora_backward import _bwd_da_kernel as fn

    # Pointers and row strides divisible by 16, as the JIT specializes them at real shapes: the
    # row loop's loads are then pipelined through shared memory (cp.async), a second code path.
    strides = ("stride_em", "stride_um", "stride_dhm", "stride_tgm", "stride_tum")
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
               if n.endswith("_ptr") or n in strides}
    for dt, out in (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32")):
        sig = {n: f"*{out}" if n in ("da_ptr", "dbg_ptr", "dbu_ptr") else f"*{dt}"
               for n in fn.arg_names if n.endswith("_ptr")}
        sig.update(scale_g="fp32", scale_u="fp32")
        for act, (bm, bi, warps) in ((0, (32, 64, 4)), (1, (64, 128, 8)), (2, (16, 16, 4))):
            c = {"ACTIVATION": act, "R_PAD": 16 if act else 64, "HAS_DB": act != 2,
                 "RT_PAD": 64 if act == 1 else 16, "BLOCK_M": bm, "BLOCK_I": bi,
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
    assert_compiles(COMPILE_SCRIPT)
