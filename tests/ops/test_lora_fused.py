"""Fused LoRA projections (ops/lora.py) against the plain-autograd references, forward and every
gradient (dx, dA, dB of each adapter), over dense and bitsandbytes 4-bit base weights."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from turbotune.ops.lora import (
    LoRAWeights,
    Projection,
    dropout_keep,
    dropout_seed,
    lora_linear,
    lora_mlp,
    lora_qkv,
)
from turbotune.ops.reference import (
    lora_linear_reference,
    lora_mlp_reference,
    lora_qkv_reference,
)
from turbotune.quant.weights import dense_weight

DTYPES = (torch.float32, torch.bfloat16)
STEP_SEED = 1234  # torch.manual_seed before each call: the fused op draws its dropout seed


def _base(kind: str, out_f: int, in_f: int, seed: int, device: str = "cpu"):
    """A frozen base weight source and its dense fp32 value.

    ``dense``: an fp32 tensor rounded to bf16 (so bf16 runs see the same W); ``nf4``: a bnb
    ``Params4bit`` with double quantization and bf16 storage; ``fp4``: a bnb ``Linear4bit``.
    """
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).bfloat16().float()
    if kind == "dense":
        w = w.to(device)
        return w, w
    if kind == "nf4":
        # bnb can store an even number of bytes only as bf16.
        storage = torch.bfloat16 if (out_f * in_f + 1) // 2 % 2 == 0 else torch.uint8
        source = bnb.nn.Params4bit(
            w, quant_type="nf4", compress_statistics=True, quant_storage=storage
        ).to(device)  # moving to a device is what quantizes
    else:
        source = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="fp4")
        source.weight = bnb.nn.Params4bit(w, quant_type="fp4", module=source)
        source = source.to(device)
    return source, dense_weight(source, torch.float32)


def _adapter(out_f: int, in_f: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) / r**0.5).requires_grad_()
    return {"A": a, "B": b}


def _ref_keeps(n: int, shapes, ps, device: str = "cpu") -> list[torch.Tensor | None]:
    """The masks the fused op draws: same step seed, projection ``j`` uses ``seed + j``."""
    torch.manual_seed(STEP_SEED)
    seed = dropout_seed()
    return [
        dropout_keep(shape, p, seed + j, torch.device(device)) if p > 0 else None
        for j, (shape, p) in enumerate(zip(shapes, ps))
    ][:n]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.3, True)])
def test_lora_linear_parity(parity, dtype, kind, dropout, bias):
    tokens, in_f, out_f, r, s = 13, 123, 77, 5, 1.7
    base, w = _base(kind, out_f, in_f, seed=1)
    master = {"x": torch.randn(1, tokens, in_f).requires_grad_(), **_adapter(out_f, in_f, r, 2)}
    if bias:
        master["bias"] = torch.randn(out_f).requires_grad_()

    def ours(x, A, B, bias=None):
        torch.manual_seed(STEP_SEED)
        return lora_linear(x, base, LoRAWeights(A, B, s, dropout), bias)

    def ref(x, A, B, bias=None):
        (keep,) = _ref_keeps(1, [(tokens, in_f)], [dropout])
        keep = None if keep is None else keep.view(x.shape)
        return lora_linear_reference(x, w, LoRAWeights(A, B, s, dropout), bias, keep=keep)

    parity(ours, ref, master, dtype, torch.device("cpu"))


# An odd hidden size keeps the adapters beside the base matmuls (4-bit rows would split a
# byte); an even one folds them in (``ops/lora_fold.py``) unless dropout is on.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kind,dropout,hidden",
    [
        ("dense", 0.0, 123),
        ("nf4", 0.0, 123),
        ("nf4", 0.2, 124),
        ("dense", 0.0, 124),
        ("nf4", 0.0, 124),
    ],
)
def test_lora_qkv_parity(parity, dtype, kind, dropout, hidden):
    """GQA shapes (k, v narrower than q); k has no adapter; v has a bias."""
    tokens, r = 13, 5
    outs = {"q": 77, "k": 31, "v": 31}
    bases = {n: _base(kind, o, hidden, seed=i) for i, (n, o) in enumerate(outs.items())}
    master = {"x": torch.randn(tokens, hidden).requires_grad_()}
    for n in ("q", "v"):
        ad = _adapter(outs[n], hidden, r, seed={"q": 10, "v": 11}[n])
        master[f"A{n}"], master[f"B{n}"] = ad["A"], ad["B"]
    master["bias_v"] = torch.randn(outs["v"]).requires_grad_()
    scalings = {"q": 2.0, "v": 0.5}

    def projections(x, Aq, Bq, Av, Bv, bias_v, dense: bool):
        pick = 1 if dense else 0
        return (
            (bases["q"][pick], LoRAWeights(Aq, Bq, scalings["q"], dropout)),
            (bases["k"][pick], None),
            (bases["v"][pick], LoRAWeights(Av, Bv, scalings["v"], dropout), bias_v),
        )

    def ours(x, **t):
        torch.manual_seed(STEP_SEED)
        return torch.cat(lora_qkv(x, *projections(x, **t, dense=False)), dim=-1)

    def ref(x, **t):
        keeps = _ref_keeps(3, [x.shape] * 3, [dropout] * 3)
        return torch.cat(lora_qkv_reference(x, *projections(x, **t, dense=True), keeps), -1)

    parity(ours, ref, master, dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "activation,kind,dropout,bias,hidden,inter",
    [
        ("silu", "dense", 0.0, False, 123, 77),
        ("silu", "nf4", 0.25, False, 123, 77),
        ("gelu_tanh", "fp4", 0.0, False, 123, 77),
        ("gelu", "nf4", 0.1, False, 123, 77),
        ("silu", "nf4", 0.0, True, 123, 77),
        # gate/up folded, down "wide" (inter >= 2 hidden): dx = [dy | g] [W; A]
        ("silu", "nf4", 0.0, False, 64, 130),
        ("silu", "dense", 0.0, True, 64, 130),
        ("gelu_tanh", "fp4", 0.0, False, 64, 130),
    ],
)
def test_lora_mlp_parity(parity, dtype, activation, kind, dropout, bias, hidden, inter):
    """Gate and down carry adapters, up has none; with ``bias``, gate and down have biases (the
    stacked gate/up output then adds [b_gate | 0])."""
    tokens, r = 13, 5
    gate, up, down = (
        _base(kind, o, i, seed=k)
        for k, (o, i) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)])
    )
    ag, ad = _adapter(inter, hidden, r, 20), _adapter(hidden, inter, r, 21)
    master = {
        "x": torch.randn(tokens, hidden).requires_grad_(),
        "Ag": ag["A"],
        "Bg": ag["B"],
        "Ad": ad["A"],
        "Bd": ad["B"],
    }
    if bias:
        master["bg"] = (0.1 * torch.randn(inter)).requires_grad_()
        master["bd"] = (0.1 * torch.randn(hidden)).requires_grad_()

    def ours(x, Ag, Bg, Ad, Bd, bg=None, bd=None):
        torch.manual_seed(STEP_SEED)
        return lora_mlp(
            x,
            (gate[0], LoRAWeights(Ag, Bg, 2.0, dropout), bg),
            (up[0], None),
            Projection(down[0], LoRAWeights(Ad, Bd, 0.75, dropout), bd),
            activation=activation,
        )

    def ref(x, Ag, Bg, Ad, Bd, bg=None, bd=None):
        keeps = _ref_keeps(3, [x.shape, x.shape, (tokens, inter)], [dropout] * 3)
        return lora_mlp_reference(
            x,
            (gate[1], LoRAWeights(Ag, Bg, 2.0, dropout), bg),
            (up[1], None),
            (down[1], LoRAWeights(Ad, Bd, 0.75, dropout), bd),
            activation=activation,
            keeps=keeps,
        )

    parity(ours, ref, master, dtype, torch.device("cpu"))


# ---- the MLP's backward: h written once, by the activation's backward kernel ----

# name: (base, dropout, hidden, inter, down adapter, activation, the path that gives dh).
# "compute": a dense base stored in the compute dtype (weights used as stored, lora_direct).
DOWN_CASES = {
    "direct": ("compute", 0.0, 16, 34, "trainable", "silu", "direct"),
    "direct-dropout": ("compute", 0.25, 23, 20, "trainable", "silu", "direct"),
    "wide": ("nf4", 0.0, 16, 34, "trainable", "silu", "wide"),
    "wide-gelu": ("fp4", 0.0, 16, 34, "trainable", "gelu", "wide"),
    "stacked": ("nf4", 0.0, 23, 20, "trainable", "gelu_tanh", "stacked"),
    "stacked-dropout": ("nf4", 0.2, 24, 20, "trainable", "silu", "stacked"),
    "frozen-A": ("nf4", 0.0, 16, 34, "frozen", "silu", "wide"),
    "no-adapter": ("nf4", 0.0, 16, 34, "none", "gelu_tanh", "stacked"),
}


@pytest.fixture
def mlp_backward_calls(monkeypatch):
    """Records which input-gradient path the down projection took, and counts the gated
    activation's kernels: forward (``h``), backward with ``h``, backward without."""
    from turbotune.ops import glu_lora_forward, lora_direct, lora_group, lora_mlp_backward

    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "auto")
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", True)
    calls = {"paths": [], "forward": 0, "with_h": 0, "without_h": 0}
    spies = {
        "direct_input_backward": "direct", "wide_input_backward": "wide",
        "base_backward": "stacked", "swiglu_forward": "forward", "geglu_forward": "forward",
        "swiglu_backward_with_h": "with_h", "geglu_backward_with_h": "with_h",
        "swiglu_backward": "without_h", "geglu_backward": "without_h",
    }  # fmt: skip

    def spy(fn, what):
        def counted(*args, **kwargs):
            if what in ("direct", "wide", "stacked"):
                calls["paths"].append(what)
            else:
                calls[what] += 1
            return fn(*args, **kwargs)

        return counted

    for name, what in spies.items():
        monkeypatch.setattr(lora_mlp_backward, name, spy(getattr(lora_mlp_backward, name), what))
    # Without dropout the kernel that writes de, du also sums dA = g^T h (h is never written).
    fused = lora_mlp_backward.glu_lora_backward  # the module
    monkeypatch.setattr(fused, "glu_backward_lora_da", spy(fused.glu_backward_lora_da, "with_h"))
    # The down projection with an adapter writes h in the kernel that also computes T.
    glu_lora = glu_lora_forward.glu_lora
    monkeypatch.setattr(glu_lora_forward, "glu_lora", spy(glu_lora, "forward"))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(DOWN_CASES))
def test_lora_mlp_down_layouts(parity, mlp_backward_calls, dtype, case):
    """Forward and every gradient vs the reference for each layout of the down projection, and
    the proof that ``h`` is computed once in forward and not again from ``e, u`` in backward:
    the activation's backward kernel writes it (only when the down adapter's ``dA`` needs it)."""
    kind, dropout, hidden, inter, down_ad, activation, path = DOWN_CASES[case]
    tokens, r = 13, 5
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    bases = [_base("dense" if kind == "compute" else kind, o, i, seed=k)
             for k, (o, i) in enumerate(shapes)]  # fmt: skip
    ag, ad = _adapter(inter, hidden, r, 20), _adapter(hidden, inter, r, 21)
    master = {"x": torch.randn(tokens, hidden).requires_grad_(), "Ag": ag["A"], "Bg": ag["B"]}
    if down_ad != "none":
        master["Ad"] = ad["A"] if down_ad == "trainable" else ad["A"].detach()
        master["Bd"] = ad["B"]

    def projections(x, Ag, Bg, Ad=None, Bd=None, ours=True):
        if kind == "compute":  # the base stored in the compute dtype
            ws = [b[1].to(x.dtype) for b in bases]
        else:
            ws = [b[0] if ours else b[1] for b in bases]
        down = LoRAWeights(Ad, Bd, 0.75, dropout) if Ad is not None else None
        return (ws[0], LoRAWeights(Ag, Bg, 2.0, dropout)), (ws[1], None), (ws[2], down)

    def ours(x, **t):
        torch.manual_seed(STEP_SEED)
        return lora_mlp(x, *projections(x, **t), activation=activation)

    def ref(x, **t):
        keeps = _ref_keeps(3, [x.shape, x.shape, (tokens, inter)], [dropout] * 3)
        gate, up, down = projections(x, **t, ours=False)
        return lora_mlp_reference(x, gate, up, down, activation=activation, keeps=keeps)

    parity(ours, ref, master, dtype, torch.device("cpu"))
    with_h = down_ad == "trainable"
    assert mlp_backward_calls == {
        "paths": [path], "forward": 1, "with_h": int(with_h), "without_h": int(not with_h)
    }, case  # fmt: skip


def _assert_close(name, got, want, eager, slack=2.0, floor=1e-5):
    """Flash-attention rule: error vs the fp32 reference <= slack x the eager low-precision error
    + a floor + one ulp of the largest value (a lucky eager run on tiny tensors)."""
    want = want.float()
    eager_err = (eager.float() - want).abs().max().item()
    scale = want.abs().max().item()
    ulp = 0.0 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    bound = slack * eager_err + floor * max(1.0, scale) + ulp * scale
    diff = (got.float() - want).abs()
    assert diff.max().item() <= bound, (
        f"{name}: max abs diff {diff.max().item():.3e} (bound {bound:.3e}, eager {eager_err:.3e}), "
        f"mean {diff.mean().item():.3e}"
    )


def _run(fn, leaves: dict[str, torch.Tensor], grad_out: torch.Tensor):
    out = fn(**leaves)
    out.backward(grad_out.to(out.dtype))
    return {"out": out.detach(), **{k: v.grad for k, v in leaves.items() if v.requires_grad}}


def test_layouts_fold_and_widen_where_they_pay(monkeypatch):
    """The parity tests above cover each path: these are the shapes that take them."""
    from turbotune.ops import lora_group
    from turbotune.ops.lora import _slots
    from turbotune.ops.lora_group import layout_of

    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", True)

    def layout(shapes, dropout=0.0, adapters=(0,)):
        meta = tuple((torch.zeros(o, i), 1.0, dropout, 0) for o, i in shapes)
        tensors = []
        for j, (o, i) in enumerate(shapes):
            lora = j in adapters
            tensors += [torch.zeros(3, i) if lora else None, torch.zeros(o, 3) if lora else None]
            tensors.append(None)
        return layout_of(_slots(meta, tuple(tensors)))

    qkv = [(77, 124), (31, 124), (31, 124)]
    assert layout(qkv).fold and not layout(qkv, dropout=0.2).fold
    assert not layout([(77, 123), (31, 123), (31, 123)]).fold  # 4-bit rows would split bytes
    assert not layout(qkv, adapters=()).fold  # nothing to fold
    assert layout([(64, 130)]).wide and not layout([(64, 100)]).wide
    assert not layout([(64, 130)], dropout=0.1).wide
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", False)  # TURBOTUNE_LORA_FOLD=0
    assert not layout(qkv).fold and not layout([(64, 130)]).wide


class _NoShape:
    """A Dequantizable weight source that does not tell its shape (stacking must cope)."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.w.to(dtype)


@pytest.mark.parametrize("q_shape_known", [False, True], ids=["stacked-by-cat", "folded"])
def test_group_with_mixed_sources_and_partial_grads(q_shape_known):
    """q/k/v over three kinds of weight source (q's shape unknown: the plain path; known: the
    folded one), a frozen A on q, no grad for x: each requested gradient matches the
    reference, the others are not produced."""
    tokens, hidden, r = 9, 40, 3
    outs = {"q": 24, "k": 8, "v": 8}
    ws = {n: torch.randn(o, hidden) / hidden**0.5 for n, o in outs.items()}
    v_source, v_dense = _base("nf4", outs["v"], hidden, seed=5)
    ws["v"] = v_dense
    q_source = ws["q"] if q_shape_known else _NoShape(ws["q"])
    sources = {"q": q_source, "k": ws["k"], "v": v_source}
    ads = {n: _adapter(outs[n], hidden, r, seed=70 + i) for i, n in enumerate(("q", "v"))}
    a_q = ads["q"]["A"].detach()  # frozen
    x = torch.randn(tokens, hidden)
    ref_leaves = {k: t.detach().clone().requires_grad_() for k, t in (
        ("Bq", ads["q"]["B"]), ("Av", ads["v"]["A"]), ("Bv", ads["v"]["B"]))}  # fmt: skip

    def run(ours: bool, t: dict):
        pick = sources if ours else ws
        q = (pick["q"], LoRAWeights(a_q, t["Bq"], 1.5))
        v = (pick["v"], LoRAWeights(t["Av"], t["Bv"], 0.5))
        fn = lora_qkv if ours else lora_qkv_reference
        return torch.cat(fn(x, q, (pick["k"], None), v), dim=-1)

    ours_leaves = {k: v.detach().clone().requires_grad_() for k, v in ref_leaves.items()}
    got, want = run(True, ours_leaves), run(False, ref_leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    for name in ref_leaves:
        torch.testing.assert_close(
            ours_leaves[name].grad, ref_leaves[name].grad, rtol=1e-5, atol=1e-5
        )
    assert a_q.grad is None and not x.requires_grad


def test_fp32_adapters_with_bf16_compute():
    """A, B stay fp32 (peft's usual setup under bf16): their grads come back in fp32."""
    tokens, in_f, out_f, r = 13, 123, 77, 5
    base, w = _base("nf4", out_f, in_f, seed=3)
    ad = _adapter(out_f, in_f, r, seed=4)
    x32 = torch.randn(tokens, in_f).bfloat16().float()
    grad_out = torch.randn(tokens, out_f)

    def leaves(x_dtype):
        return {
            "x": x32.detach().to(x_dtype, copy=True).requires_grad_(),
            "A": ad["A"].detach().clone().requires_grad_(),
            "B": ad["B"].detach().clone().requires_grad_(),
        }

    def ref(x, A, B):
        return lora_linear_reference(x, w, LoRAWeights(A, B, 2.0))

    def ours(x, A, B):
        return lora_linear(x, base, LoRAWeights(A, B, 2.0))

    want = _run(ref, leaves(torch.float32), grad_out)
    eager = _run(ref, leaves(torch.bfloat16), grad_out)
    got = _run(ours, leaves(torch.bfloat16), grad_out)
    assert got["out"].dtype == got["x"].dtype == torch.bfloat16
    assert got["A"].dtype == got["B"].dtype == torch.float32
    for name in want:
        _assert_close(name, got[name], want[name], eager[name])


def test_autocast_casts_input_and_runs_in_autocast_dtype():
    tokens, in_f, out_f, r = 9, 40, 24, 4
    w = torch.randn(out_f, in_f) / in_f**0.5
    ad = _adapter(out_f, in_f, r, seed=5)
    grad_out = torch.randn(tokens, out_f)
    x0 = torch.randn(tokens, in_f)

    def leaves():
        return {
            "x": x0.clone().requires_grad_(),
            "A": ad["A"].detach().clone().requires_grad_(),
            "B": ad["B"].detach().clone().requires_grad_(),
        }

    def ref(x, A, B):
        return lora_linear_reference(x, w, LoRAWeights(A, B, 1.5))

    def under_autocast(fn):
        def run(**t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(**t)

        return run

    want = _run(ref, leaves(), grad_out)
    eager = _run(under_autocast(ref), leaves(), grad_out)
    got = _run(
        under_autocast(lambda x, A, B: lora_linear(x, w, LoRAWeights(A, B, 1.5))),
        leaves(),
        grad_out,
    )
    assert got["out"].dtype == torch.bfloat16
    assert got["x"].dtype == got["A"].dtype == torch.float32
    for name in want:
        _assert_close(name, got[name], want[name], eager[name])


def test_dropout_masks_follow_the_seed():
    """Masks: Bernoulli(1 - p), fixed by the seed, distinct per projection index and per step."""
    shape, p = (64, 96), 0.3
    cpu = torch.device("cpu")
    keep = dropout_keep(shape, p, 42, cpu)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, dropout_keep(shape, p, 42, cpu))
    assert not torch.equal(keep, dropout_keep(shape, p, 43, cpu))
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"kept fraction {kept:.3f}, expected {1 - p}"
    torch.manual_seed(0)
    first = dropout_seed()
    assert dropout_seed() != first  # each step draws afresh
    torch.manual_seed(0)
    assert dropout_seed() == first  # ... reproducibly


def test_dropout_applies_one_mask_in_forward_and_backward():
    """With a hand-checked mask: dropped input columns contribute nothing to y's LoRA part or to
    dA, and dx's LoRA part is masked the same way; the base path ignores the mask."""
    tokens, in_f, out_f, r, p, s = 6, 10, 4, 3, 0.5, 1.0
    w = torch.zeros(out_f, in_f)  # base path off: y and dx are the LoRA branch alone
    ad = _adapter(out_f, in_f, r, seed=6)
    x = torch.randn(tokens, in_f, requires_grad=True)
    torch.manual_seed(STEP_SEED)
    y = lora_linear(x, w, LoRAWeights(ad["A"], ad["B"], s, p))
    dy = torch.randn_like(y)
    y.backward(dy)
    (keep,) = _ref_keeps(1, [(tokens, in_f)], [p])
    assert 0 < keep.sum() < keep.numel(), "mask should drop some and keep some elements"
    # Manual mask arithmetic (no reference function involved).
    xd = torch.where(keep, x.detach() * 2.0, 0.0)  # 1 / (1 - p) = 2
    a, b = ad["A"].detach(), ad["B"].detach()
    torch.testing.assert_close(y.detach(), xd @ a.t() @ b.t())
    g = dy @ b
    torch.testing.assert_close(ad["A"].grad, g.t() @ xd)
    torch.testing.assert_close(ad["B"].grad, dy.t() @ (xd @ a.t()))
    torch.testing.assert_close(x.grad, torch.where(keep, (g @ a) * 2.0, 0.0))
    assert torch.all(x.grad[~keep] == 0)


def _backward_node(y: torch.Tensor, name: str):
    """The custom Function's node behind ``y`` (``y`` is a view of the Function's output)."""
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return node
        todo += [n for n, _ in node.next_functions]
    raise AssertionError(f"{name} not found in the graph")


def test_no_dense_base_weight_is_saved():
    """Saved for backward: x (once for q/k/v), [e | u], the [M, r] products, A, B, their
    compute-dtype casts and bias — never W."""
    tokens, hidden, inter, r = 13, 123, 77, 5
    gate, up, down = (
        _base("nf4", o, i, seed=k)[0]
        for k, (o, i) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)])
    )
    x = torch.randn(tokens, hidden, requires_grad=True)
    lg, ld = _adapter(inter, hidden, r, 7), _adapter(hidden, inter, r, 8)
    y = lora_mlp(
        x,
        (gate, LoRAWeights(lg["A"], lg["B"], 2.0)),
        (up, None),
        (down, LoRAWeights(ld["A"], ld["B"], 2.0)),
    )
    saved = _backward_node(y, "LoRAMLPFunctionBackward").saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved if t is not None)
    big = [s for s in shapes if s[0] * s[-1] >= inter * hidden]
    assert big == [], f"weight-sized tensors saved: {big}"
    assert shapes.count((tokens, 2 * inter)) == 1  # e and u, side by side
    assert shapes.count((tokens, hidden)) == 1  # x

    q, *_ = lora_qkv(x, (gate, LoRAWeights(lg["A"], lg["B"], 2.0)), (up, None), (up, None))
    saved = _backward_node(q, "LoRAProjectionsFunctionBackward").saved_tensors
    assert [tuple(t.shape) for t in saved if t is not None].count((tokens, hidden)) == 1


def test_folded_group_saves_x_with_its_adapter_products():
    """Folded adapters save [x | T] (x with the rank columns, padded to 8) instead of x."""
    tokens, hidden, inter, r = 13, 64, 96, 5
    gate, up, down = (
        _base("nf4", o, i, seed=k)[0]
        for k, (o, i) in enumerate([(inter, hidden), (inter, hidden), (hidden, inter)])
    )
    x = torch.randn(tokens, hidden, requires_grad=True)
    lg, lu = _adapter(inter, hidden, r, 7), _adapter(inter, hidden, r, 8)
    y = lora_mlp(
        x, (gate, LoRAWeights(lg["A"], lg["B"], 2.0)), (up, LoRAWeights(lu["A"], lu["B"], 1.0)),
        (down, None),
    )  # fmt: skip
    saved = _backward_node(y, "LoRAMLPFunctionBackward").saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved if t is not None)
    assert shapes.count((tokens, hidden + 16)) == 1, shapes  # [x | T_gate | T_up | 0]
    assert shapes.count((tokens, hidden)) == 0 and shapes.count((tokens, 2 * inter)) == 1
    assert not [s for s in shapes if s[0] * s[-1] >= inter * hidden], shapes


def test_frozen_adapters_and_no_input_grad():
    """Only requested gradients are produced; a layer without any adapter still gives dx."""
    tokens, in_f, out_f, r = 5, 12, 7, 2
    w = torch.randn(out_f, in_f)
    ad = _adapter(out_f, in_f, r, seed=9)
    a_frozen = ad["A"].detach()
    x = torch.randn(tokens, in_f, requires_grad=True)
    lora_linear(x, w, LoRAWeights(a_frozen, ad["B"], 1.0)).sum().backward()
    assert ad["B"].grad is not None and a_frozen.grad is None
    torch.testing.assert_close(x.grad, torch.ones(tokens, out_f) @ (w + ad["B"] @ a_frozen))

    x2 = torch.randn(tokens, in_f)  # no grad to x: only the adapter's
    lora_linear(x2, w, LoRAWeights(ad["A"], ad["B"], 1.0)).sum().backward()
    assert ad["A"].grad is not None

    x3 = torch.randn(tokens, in_f, requires_grad=True)
    lora_linear(x3, w).sum().backward()
    torch.testing.assert_close(x3.grad, torch.ones(tokens, out_f) @ w)


def test_strided_3d_input_and_module_bases():
    """x as a non-contiguous [B, S, H] view; bases given as nn.Linear and bnb Linear4bit."""
    hidden, out_f, r = 33, 21, 3
    dense_mod = torch.nn.Linear(hidden, out_f, bias=False)
    nf4_mod = _base("fp4", out_f, hidden, seed=11)[0]
    ad = _adapter(out_f, hidden, r, seed=12)
    x_full = torch.randn(2, 5, 2 * hidden)
    for mod in (dense_mod, nf4_mod):
        x = x_full[..., ::2].detach().requires_grad_()
        assert not x.is_contiguous()
        y = lora_linear(x, mod, LoRAWeights(ad["A"], ad["B"], 1.0))
        assert y.shape == (2, 5, out_f)
        x_ref = x.detach().clone().requires_grad_()
        w = dense_weight(mod, torch.float32)
        y_ref = lora_linear_reference(x_ref, w, LoRAWeights(ad["A"], ad["B"], 1.0))
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        y_ref.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)


def test_mlp_backward_twice_is_refused():
    w1, w2 = torch.randn(8, 6), torch.randn(6, 8)
    x = torch.randn(3, 6, requires_grad=True)
    y = lora_mlp(x, (w1, None), (w1, None), (w2, None))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        y.sum().backward()


def test_invalid_dropout_is_an_error():
    w = torch.randn(4, 3)
    ad = _adapter(4, 3, 1, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(torch.randn(2, 3), w, LoRAWeights(ad["A"], ad["B"], 1.0, 1.0))


# ---- GPU: Llama-3-8B shapes (hidden 4096, intermediate 14336, 8 KV heads), r = 16 ----

LLAMA = {"tokens": 4096, "hidden": 4096, "inter": 14336, "kv": 1024, "r": 16}


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_mlp_llama8b_nf4_gpu(parity, dropout):
    m, h, i, r = LLAMA["tokens"], LLAMA["hidden"], LLAMA["inter"], LLAMA["r"]
    shapes = [(i, h), (i, h), (h, i)]
    bases = [_base("nf4", o, n, seed=k, device="cuda") for k, (o, n) in enumerate(shapes)]
    ads = [_adapter(o, n, r, seed=30 + k) for k, (o, n) in enumerate(shapes)]
    master = {"x": torch.randn(m, h).requires_grad_()}
    for k, ad in enumerate(ads):
        master[f"A{k}"], master[f"B{k}"] = ad["A"], ad["B"]

    def projections(t, pick):
        return [
            (bases[k][pick], LoRAWeights(t[f"A{k}"], t[f"B{k}"], 2.0, dropout)) for k in range(3)
        ]

    def ours(x, **t):
        torch.manual_seed(STEP_SEED)
        return lora_mlp(x, *projections(t, 0))

    def ref(x, **t):
        keeps = _ref_keeps(3, [(m, h), (m, h), (m, i)], [dropout] * 3, device="cuda")
        return lora_mlp_reference(x, *projections(t, 1), keeps=keeps)

    parity(ours, ref, master, torch.bfloat16, torch.device("cuda"))


@pytest.mark.gpu
def test_lora_qkv_llama8b_nf4_gpu(parity):
    m, h, kv, r = LLAMA["tokens"], LLAMA["hidden"], LLAMA["kv"], LLAMA["r"]
    outs = (h, kv, kv)
    bases = [_base("nf4", o, h, seed=40 + k, device="cuda") for k, o in enumerate(outs)]
    ads = [_adapter(o, h, r, seed=50 + k) for k, o in enumerate(outs)]
    master = {"x": torch.randn(m, h).requires_grad_()}
    for k, ad in enumerate(ads):
        master[f"A{k}"], master[f"B{k}"] = ad["A"], ad["B"]

    def projections(t, pick):
        return [(bases[k][pick], LoRAWeights(t[f"A{k}"], t[f"B{k}"], 2.0)) for k in range(3)]

    def ours(x, **t):
        return torch.cat(lora_qkv(x, *projections(t, 0)), dim=-1)

    def ref(x, **t):
        return torch.cat(lora_qkv_reference(x, *projections(t, 1)), dim=-1)

    parity(ours, ref, master, torch.bfloat16, torch.device("cuda"))


@pytest.mark.gpu
def test_lora_mlp_llama8b_memory_gpu():
    """After forward the fused MLP holds only e, u and [x | T]; the eager
    composition over dequantized weights also holds the three dense weights, silu(e) and h."""
    m, h, i, r = LLAMA["tokens"], LLAMA["hidden"], LLAMA["inter"], LLAMA["r"]
    shapes = [(i, h), (i, h), (h, i)]
    bases = [_base("nf4", o, n, seed=k, device="cuda") for k, (o, n) in enumerate(shapes)]
    loras = []
    for k, (o, n) in enumerate(shapes):
        ad = _adapter(o, n, r, seed=60 + k)
        loras.append(
            LoRAWeights(
                ad["A"].cuda().detach().requires_grad_(),
                ad["B"].cuda().detach().requires_grad_(),
                2.0,
            )
        )
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def retained(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = fn()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        y.backward(torch.ones_like(y))
        return held

    fused = retained(lambda: lora_mlp(x, *[(b[0], lo) for b, lo in zip(bases, loras)]))
    eager = retained(
        lambda: lora_mlp_reference(
            x, *[(dense_weight(b[0], torch.bfloat16), lo) for b, lo in zip(bases, loras)]
        )
    )
    activation = m * i * 2  # one bf16 [M, inter] tensor
    # The folded adapters save [x | T] ([M, h + 48]) instead of x: in a model x (the norm's
    # output) is then freed, here the test holds it, so that copy counts.
    x_aug = m * (h + 48) * 2
    assert fused <= 2 * activation + x_aug + (8 << 20), f"fused holds {fused / 2**20:.0f} MiB"
    assert fused < 0.4 * eager, f"fused {fused / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"
