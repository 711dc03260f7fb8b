"""ops/glu_lora_forward: h written with T = h A^T behind it, and the LoRA MLP's one-GEMM down
projection.

``glu_lora`` is checked against the fp32 eager reference (``act(e) * u``, then ``h_rounded A^T``)
and against the activation kernel it must equal bit for bit; ``lora_mlp`` is run with the fast
path on and off (output and every gradient against the fp32 reference, per the flash-attention
rule), on NF4, fp32-dense and compute-dtype (``lora_direct``) bases.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from turbotune.ops import glu_lora_forward, lora_direct, lora_group
from turbotune.ops.glu_lora_forward import glu_lora
from turbotune.ops.lora import LoRAWeights, lora_mlp
from turbotune.ops.lora_mlp_backward import glu_forward
from turbotune.ops.reference import lora_mlp_reference
from turbotune.quant.weights import dense_weight

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _h_reference(e: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    e, u = e.float(), u.float()
    if activation == "silu":
        return torch.nn.functional.silu(e) * u
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.nn.functional.gelu(e, approximate=approximate) * u


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.float() - want.float()).abs()
    return f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"


# ---- glu_lora ----

# (M, I, r, activation): tiny, prime, one row block exactly, above it, wide ranks; each
# activation on two shapes.
SHAPES = [
    (1, 16, 1, "silu"),
    (7, 100, 8, "gelu_tanh"),
    (64, 1000, 16, "gelu"),
    (257, 100, 64, "silu"),
    (257, 1000, 8, "gelu_tanh"),
    (7, 16, 64, "gelu"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_glu_lora_matches_reference(device, dtype, shape):
    n_rows, n_cols, rank, activation = shape
    gen = torch.Generator().manual_seed(n_rows * 7 + n_cols + rank)
    # e, u as the column halves of [e | u], as the MLP hands them over (row stride 2 I).
    eu = (2 * torch.randn(n_rows, 2 * n_cols, generator=gen)).to(device, dtype)
    e, u = eu[:, :n_cols], eu[:, n_cols:]
    a = (torch.randn(rank, n_cols, generator=gen) / n_cols**0.5).to(device, dtype)
    room = -(-rank // 8) * 8
    wide, t = glu_lora(e, u, a, activation, room=room)
    h = wide[:, :n_cols]

    # h: the activation kernel's, bit for bit, and within one rounding of the fp32 value.
    assert torch.equal(h, glu_forward(e, u, activation)), _max_diff(
        h, glu_forward(e, u, activation)
    )
    h_ref = _h_reference(e, u, activation)
    ulp = 2 * torch.finfo(dtype).eps  # interpreter bf16 stores truncate: a whole ulp
    assert (h.float() - h_ref).abs().max() <= ulp * h_ref.abs().max() + 1e-6, _max_diff(h, h_ref)

    # T from the rounded h (the eager mm in dtype).
    t_ref = h.double() @ a.double().t()
    eager_err = ((h @ a.t()).double() - t_ref).abs().max().item()
    bound = 2 * eager_err + ulp * t_ref.abs().max().item() + 1e-5
    assert (t.double() - t_ref).abs().max().item() <= bound, _max_diff(t, t_ref)
    assert t.shape == (n_rows, rank) and t.dtype == dtype
    # The spare columns: T, then zeros.
    assert torch.equal(wide[:, n_cols : n_cols + rank], t)
    assert not wide[:, n_cols + rank :].any()


def test_glu_lora_without_room(device):
    """room = 0 (the direct layout's case) gives the same h and T as with room."""
    gen = torch.Generator().manual_seed(3)
    e, u = (torch.randn(2, 45, 300, generator=gen).to(device, torch.bfloat16)).unbind(0)
    a = torch.randn(12, 300, generator=gen).to(device, torch.bfloat16)
    h, t = glu_lora(e, u, a, "silu")
    h2, t2 = glu_lora(e, u, a, "silu", room=16)
    assert h.shape == (45, 300) and torch.equal(h, h2[:, :300])
    # A mm over h with another row stride: a rounding of T apart at most.
    assert (t.float() - t2.float()).abs().max() <= 2 * 2**-7 * t.float().abs().max(), _max_diff(
        t, t2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_triton_writes_the_same_wide_buffer(monkeypatch, device, dtype):
    """Where Triton does not run, the eager reference's h is copied into the wide buffer: the
    same layout, h bit for bit, and T within a rounding of the default path's."""
    gen = torch.Generator().manual_seed(4)
    eu = torch.randn(37, 2 * 100, generator=gen).to(device, dtype)
    e, u = eu.narrow(1, 0, 100), eu.narrow(1, 100, 100)
    a = (torch.randn(9, 100, generator=gen) / 10).to(device, dtype)
    wide, t = glu_lora(e, u, a, "gelu_tanh", room=16)
    monkeypatch.setattr(glu_lora_forward, "use_triton", lambda *tensors: False)
    wide2, t2 = glu_lora(e, u, a, "gelu_tanh", room=16)
    assert torch.equal(wide[:, :100], wide2[:, :100]), _max_diff(wide[:, :100], wide2[:, :100])
    assert torch.equal(wide2[:, 100:109], t2) and not wide2[:, 109:].any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(t.float(), t2.float(), rtol=tol, atol=tol)


def test_glu_lora_rejects_mismatched_inputs(device):
    e = torch.zeros(4, 32, device=device)
    with pytest.raises(ValueError):
        glu_lora(e, e, torch.zeros(4, 31, device=device), "silu")
    with pytest.raises(ValueError):
        glu_lora(e, e, torch.zeros(8, 32, device=device), "silu", room=4)


# ---- lora_mlp with the fast path on and off ----


def _bases(kind: str, hidden: int, inter: int, device) -> list[tuple]:
    """``(source, dense fp32)`` for gate, up, down."""
    out = []
    for k, (o, i) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)]):
        gen = torch.Generator().manual_seed(k)
        w = (torch.randn(o, i, generator=gen) / i**0.5).bfloat16().float()
        if kind == "nf4":
            storage = torch.bfloat16 if (o * i + 1) // 2 % 2 == 0 else torch.uint8
            source = bnb.nn.Params4bit(
                w, quant_type="nf4", compress_statistics=True, quant_storage=storage
            ).to(device)
            out.append((source, dense_weight(source, torch.float32)))
        else:
            out.append((w.to(device), w.to(device)))
    return out


def _leaves(hidden: int, inter: int, rank: int, bias: bool, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(11)

    def leaf(*shape, scale=1.0):
        t = scale * torch.randn(*shape, generator=gen)
        return t.to(dtype).to(device).requires_grad_()

    leaves = {
        "x": leaf(13, hidden),
        "Ag": leaf(rank, hidden, scale=hidden**-0.5),
        "Bg": leaf(inter, rank, scale=rank**-0.5),
        "Ad": leaf(rank, inter, scale=inter**-0.5),
        "Bd": leaf(hidden, rank, scale=rank**-0.5),
    }
    if bias:
        leaves["bd"] = leaf(hidden, scale=0.1)
    return leaves


def _mlp(bases, kind, activation, fused: bool, x, Ag, Bg, Ad, Bd, bd=None):
    """``lora_mlp`` (fused) or the reference on the same weights; "compute" bases are stored in
    ``x``'s dtype (the weights-as-stored layout)."""
    if kind == "compute" or not fused:
        ws = [b[1].to(x.dtype) for b in bases]
    else:
        ws = [b[0] for b in bases]
    gate = (ws[0], LoRAWeights(Ag, Bg, 2.0))
    up = (ws[1], None)
    down = (ws[2], LoRAWeights(Ad, Bd, 0.75), bd)
    if fused:
        return lora_mlp(x, gate, up, down, activation=activation)
    return lora_mlp_reference(x, gate, up, down, activation=activation)


def _run(fn, leaves: dict, grad_out: torch.Tensor) -> dict:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out = fn(**leaves)
    out.backward(grad_out.to(out.dtype))
    return {"output": out.detach(), **{k: v.grad for k, v in leaves.items()}}


@pytest.fixture
def down_calls(monkeypatch):
    """Counts the fast down projection's runs, by layout."""
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "auto")
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", True)
    calls = []

    def counted(*args, _fn=glu_lora_forward.down_forward, **kwargs):
        calls.append("direct" if args[3].direct else "folded")
        return _fn(*args, **kwargs)

    monkeypatch.setattr(glu_lora_forward, "down_forward", counted)
    return calls


# (base, hidden, inter, path): NF4 with the wide down layout, NF4 with the stacked one (inter < 2
# hidden), an fp32 dense base (cast to bf16: folded), a base stored in the compute dtype.
MLP_CASES = {
    "nf4-wide": ("nf4", 16, 40, "folded"),
    "nf4-stacked": ("nf4", 24, 20, "folded"),
    "dense": ("dense", 16, 34, "folded"),
    "compute": ("compute", 16, 34, "direct"),
}


# (activation, bias on down, dtype)
MLP_RUNS = [
    ("silu", False, torch.float32),
    ("silu", False, torch.bfloat16),
    ("silu", True, torch.bfloat16),
    ("gelu_tanh", False, torch.bfloat16),
    ("gelu", True, torch.float32),
]


@pytest.mark.parametrize("run", MLP_RUNS, ids=str)
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_lora_mlp_on_matches_off(monkeypatch, down_calls, device, case, run):
    """Output and every gradient with the fast path on are as close to the fp32 reference as
    with it off (2x the off run's error, plus a bf16 ulp), and the fast path runs."""
    kind, hidden, inter, path = MLP_CASES[case]
    activation, bias, dtype = run
    if kind == "dense" and dtype == torch.float32:  # fp32 weights in an fp32 run: as stored
        path = "direct"
    bases = _bases(kind, hidden, inter, device)
    leaves = _leaves(hidden, inter, 5, bias, device, dtype)
    grad_out = torch.randn(13, hidden, generator=torch.Generator().manual_seed(5)).to(device)
    ref_leaves = {k: v.detach().float() for k, v in leaves.items()}
    want = _run(lambda **t: _mlp(bases, kind, activation, False, **t), ref_leaves, grad_out)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(glu_lora_forward, "ENABLED", enabled)
        runs[enabled] = _run(lambda **t: _mlp(bases, kind, activation, True, **t), leaves, grad_out)
    assert down_calls == [path], down_calls
    ulp = 0.0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    failures = []
    for name, ref in want.items():
        on, off = runs[True][name].float(), runs[False][name].float()
        scale = ref.abs().max().item()
        bound = 2 * (off - ref).abs().max().item() + ulp * scale + 1e-5 * max(1.0, scale)
        err = (on - ref).abs()
        if err.max().item() > bound:
            failures.append(
                f"{name}: {_max_diff(on, ref)} (bound {bound:.3e}, off {_max_diff(off, ref)})"
            )
    assert not failures, "\n".join(failures)


def test_saves_t_alone_and_no_wide_buffer(down_calls, device):
    """Backward keeps ``t`` as its own ``[M, r]`` tensor, not a view holding ``[h | T]``."""
    bases = _bases("nf4", 16, 40, device)
    leaves = _leaves(16, 40, 5, False, device, torch.float32)
    y = _mlp(bases, "nf4", "silu", True, **leaves)
    node = y.grad_fn.next_functions[0][0]  # under lora_mlp's final view
    saved = node.saved_tensors
    t = [s for s in saved if s is not None and tuple(s.shape) == (13, 5)]
    assert t and all(s.untyped_storage().nbytes() == 13 * 5 * 4 for s in t)
    assert all(s.untyped_storage().nbytes() <= 13 * 80 * 4 for s in saved if s is not None)
    assert down_calls == ["folded"]


def test_checkpointed_mlp_reuses_the_folded_weight(monkeypatch, down_calls, device):
    """Under activation checkpointing the recomputed forward leaves the W part of its folded
    weight (a strided column view) to the backward's ``dh = dy W``; gradients equal the
    unfused path's."""
    bases = _bases("nf4", 16, 40, device)
    leaves = _leaves(16, 40, 5, True, device, torch.float32)
    grad_out = torch.randn(13, 16, generator=torch.Generator().manual_seed(2)).to(device)
    taken = []
    take = lora_group.take

    def spy(kind, slots, dtype):
        got = take(kind, slots, dtype)
        taken.append((kind, got is not None and not got.is_contiguous()))
        return got

    monkeypatch.setattr(lora_group, "take", spy)

    def fn(**t):
        return checkpoint(
            lambda *v: _mlp(bases, "nf4", "silu", True, *v), *t.values(), use_reentrant=False
        )

    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(glu_lora_forward, "ENABLED", enabled)
        taken.clear()
        runs[enabled] = _run(fn, leaves, grad_out)
    assert ("stacked", True) in taken, taken
    for name, off in runs[False].items():
        on = runs[True][name]
        assert torch.allclose(on, off, rtol=1e-4, atol=1e-5), f"{name}: {_max_diff(on, off)}"


# ---- the residual riding on the down GEMM ----

# (base, down dropout, residual dtype, path): folded, direct, old path (dropout), added outside.
RESIDUAL_CASES = {
    "folded": ("nf4", 0.0, None, ["folded"]),
    "direct": ("compute", 0.0, None, ["direct"]),
    "dropout": ("nf4", 0.1, None, []),
    "fp32-residual": ("nf4", 0.0, torch.float32, ["folded"]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(RESIDUAL_CASES))
def test_residual_matches_adding_it(down_calls, device, case, dtype):
    """``lora_mlp(..., residual=r)`` equals ``r + lora_mlp(...)``: the output to a rounding (the
    GEMM adds ``r`` before its one rounding), every gradient exactly (``r``'s is ``dy``)."""
    kind, dropout, res_dtype, path = RESIDUAL_CASES[case]
    bases = _bases(kind, 16, 40, device)
    leaves = _leaves(16, 40, 5, False, device, dtype)
    gen = torch.Generator().manual_seed(9)
    leaves["r"] = torch.randn(13, 16, generator=gen).to(device, res_dtype or dtype).requires_grad_()
    grad_out = torch.randn(13, 16, generator=gen).to(device)

    def mlp(x, Ag, Bg, Ad, Bd, r, fold: bool):
        ws = [b[1].to(x.dtype) for b in bases] if kind == "compute" else [b[0] for b in bases]
        torch.manual_seed(0)  # the dropout seed
        gate, up = (ws[0], LoRAWeights(Ag, Bg, 2.0)), (ws[1], None)
        down = (ws[2], LoRAWeights(Ad, Bd, 0.75, dropout))
        if fold:
            return lora_mlp(x, gate, up, down, residual=r)
        return r + lora_mlp(x, gate, up, down)

    got = _run(lambda **t: mlp(**t, fold=True), leaves, grad_out)
    want = _run(lambda **t: mlp(**t, fold=False), leaves, grad_out)
    assert down_calls == path * 2, down_calls
    ulp = 0.0 if got["output"].dtype == torch.float32 else torch.finfo(dtype).eps
    bound = 1e-6 + ulp * want["output"].abs().max().item()
    assert got["output"].dtype == want["output"].dtype
    assert (got["output"] - want["output"]).abs().max() <= bound, _max_diff(
        got["output"], want["output"]
    )
    for name in leaves:
        assert torch.equal(got[name], want[name]), f"{name}: {_max_diff(got[name], want[name])}"


# ---- real shapes on the GPU ----


@pytest.mark.gpu
def test_glu_lora_llama8b_gpu():
    """M = 4096, I = 14336, r = 16 in bf16: h equals the activation kernel's, T is within the
    eager mm's error of the fp64 value, the spare columns hold T."""
    n_rows, n_cols, rank = 4096, 14336, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    eu = torch.randn(n_rows, 2 * n_cols, device="cuda", generator=gen).bfloat16()
    e, u = eu[:, :n_cols], eu[:, n_cols:]
    a = (torch.randn(rank, n_cols, device="cuda", generator=gen) / n_cols**0.5).bfloat16()
    wide, t = glu_lora(e, u, a, "silu", room=rank)
    h = wide[:, :n_cols]
    assert torch.equal(h, glu_forward(e, u, "silu"))
    t_ref = h.double() @ a.double().t()
    eager_err = ((h @ a.t()).double() - t_ref).abs().max().item()
    assert (t.double() - t_ref).abs().max().item() <= 2 * eager_err + 1e-3, _max_diff(t, t_ref)
    assert torch.equal(wide[:, n_cols:], t)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "compute"])
def test_lora_mlp_llama8b_on_matches_off_gpu(monkeypatch, kind):
    """Llama-3.1-8B MLP at 4096 tokens, r = 16, bf16: on vs off, output and every gradient
    against the fp32 reference (2x the off run's error + a bf16 ulp)."""
    hidden, inter, rank, device = 4096, 14336, 16, torch.device("cuda")
    bases = _bases(kind, hidden, inter, device)
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).bfloat16().to(device).requires_grad_()

    leaves = {
        "x": leaf(4096, hidden),
        "Ag": leaf(rank, hidden, scale=hidden**-0.5),
        "Bg": leaf(inter, rank, scale=0.02),
        "Ad": leaf(rank, inter, scale=inter**-0.5),
        "Bd": leaf(hidden, rank, scale=0.02),
    }
    grad_out = torch.randn(4096, hidden, generator=gen).to(device)
    ref_leaves = {k: v.detach().float() for k, v in leaves.items()}
    want = _run(lambda **t: _mlp(bases, kind, "silu", False, **t), ref_leaves, grad_out)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(glu_lora_forward, "ENABLED", enabled)
        runs[enabled] = _run(lambda **t: _mlp(bases, kind, "silu", True, **t), leaves, grad_out)
    for name, ref in want.items():
        on, off = runs[True][name].float(), runs[False][name].float()
        scale = ref.abs().max().item()
        bound = 2 * (off - ref).abs().max().item() + 2**-8 * scale
        assert (on - ref).abs().max().item() <= bound, f"{name}: {_max_diff(on, ref)}"
