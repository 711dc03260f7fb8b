"""Fused LoRA groups over plain dense weights in the compute dtype (ops/lora_direct.py): each
weight used as stored, never copied into a stacked or folded buffer. Forward and every gradient
against the plain-autograd references; the copying path is switched off to prove it is not the
one that ran; the traffic model picks the copying layout at many rows."""

from __future__ import annotations

import pytest
import torch

from turbotune.ops import glu_lora_forward, lora_direct, lora_fold, lora_group, lora_mlp_backward
from turbotune.ops.lora import (
    LoRAWeights,
    dropout_keep,
    dropout_seed,
    lora_linear,
    lora_mlp,
    lora_qkv,
)
from turbotune.ops.lora_group import Slot
from turbotune.ops.reference import lora_linear_reference, lora_mlp_reference, lora_qkv_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEP_SEED = 99


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).bfloat16().float()


def _adapter(out_f: int, in_f: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).requires_grad_()
    return a, (torch.randn(out_f, r, generator=gen) / r**0.5).requires_grad_()


def _keeps(shapes, p: float):
    torch.manual_seed(STEP_SEED)
    seed = dropout_seed()
    return [dropout_keep(s, p, seed + j, torch.device("cpu")) if p > 0 else None
            for j, s in enumerate(shapes)]  # fmt: skip


@pytest.fixture
def no_weight_copies(monkeypatch):
    """The copying path (dense_weight into stacked or folded buffers) fails if it runs; counts
    the direct forwards and backwards that ran instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("a plain weight in the compute dtype was copied (dense_weight)")

    monkeypatch.setattr(lora_group, "dense_weight", refuse)
    monkeypatch.setattr(lora_fold, "dense_weight", refuse)
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "auto")
    calls = {"forward": 0, "backward": 0}
    for name, fn in (("forward", lora_direct.direct_forward),
                     ("backward", lora_direct.direct_backward)):  # fmt: skip

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(f"turbotune.ops.lora.direct_{name}", counted)

    # The MLP's down projection runs its direct backward in two halves (input gradient first,
    # ``ops/lora_mlp_backward.py``): its first half counts as that projection's backward.
    def counted_input(*args, _fn=lora_mlp_backward.direct_input_backward, **kwargs):
        calls["backward"] += 1
        return _fn(*args, **kwargs)

    monkeypatch.setattr(lora_mlp_backward, "direct_input_backward", counted_input)

    # The MLP's down projection with an adapter runs its direct forward in ops/glu_lora_forward.py.
    def counted_down(*args, _fn=glu_lora_forward.down_forward, **kwargs):
        calls["forward"] += int(args[3].direct)  # args: e, u, down, layout, ...
        return _fn(*args, **kwargs)

    monkeypatch.setattr(glu_lora_forward, "down_forward", counted_down)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.3, True)])
def test_lone_projection_on_a_weight_in_compute_dtype(parity, no_weight_copies, dtype, dropout, bias):  # fmt: skip
    """A 3-D input, in = 2.5 out (a wide projection: its copying backward would stack [W; A])."""
    tokens, in_f, out_f, r = 13, 95, 38, 5
    w = _weight(out_f, in_f, seed=3)
    a, b = _adapter(out_f, in_f, r, seed=4)
    master = {"x": torch.randn(1, tokens, in_f).requires_grad_(), "A": a, "B": b}
    if bias:
        master["bias"] = torch.randn(out_f).requires_grad_()

    def ours(x, A, B, bias=None):
        torch.manual_seed(STEP_SEED)
        return lora_linear(x, w.to(x.dtype), LoRAWeights(A, B, 1.5, dropout), bias)

    def ref(x, A, B, bias=None):
        (keep,) = _keeps([(tokens, in_f)], dropout)
        keep = None if keep is None else keep.view(x.shape)
        return lora_linear_reference(x, w, LoRAWeights(A, B, 1.5, dropout), bias, keep=keep)

    parity(ours, ref, master, dtype, torch.device("cpu"))
    assert no_weight_copies == {"forward": 1, "backward": 1}


# hidden 124 would fold q/k/v (even rows) and 123 would not: both run direct here.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout,hidden", [(0.0, 124), (0.0, 123), (0.2, 124)])
def test_qkv_on_weights_in_compute_dtype(parity, no_weight_copies, dtype, dropout, hidden):
    """GQA shapes; k has no adapter; v has a bias."""
    tokens, r = 13, 5
    outs = {"q": 77, "k": 31, "v": 31}
    ws = {n: _weight(o, hidden, seed=i) for i, (n, o) in enumerate(outs.items())}
    master = {"x": torch.randn(tokens, hidden).requires_grad_()}
    for i, n in enumerate(("q", "v")):
        master[f"A{n}"], master[f"B{n}"] = _adapter(outs[n], hidden, r, seed=10 + i)
    master["bias_v"] = torch.randn(outs["v"]).requires_grad_()

    def projections(x, Aq, Bq, Av, Bv, bias_v):
        w = {n: t.to(x.dtype) for n, t in ws.items()}  # the base stored in the compute dtype
        return (
            (w["q"], LoRAWeights(Aq, Bq, 2.0, dropout)),
            (w["k"], None),
            (w["v"], LoRAWeights(Av, Bv, 0.5, dropout), bias_v),
        )

    def ours(x, **t):
        torch.manual_seed(STEP_SEED)
        return torch.cat(lora_qkv(x, *projections(x, **t)), dim=-1)

    def ref(x, **t):
        keeps = _keeps([x.shape] * 3, dropout)
        return torch.cat(lora_qkv_reference(x, *projections(x, **t), keeps), dim=-1)

    parity(ours, ref, master, dtype, torch.device("cpu"))
    assert no_weight_copies == {"forward": 1, "backward": 1}


# inter >= 2 hidden: down would take the "wide" backward ([dy | g] [W; A], a weight copy)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "dropout,bias,hidden,inter", [(0.0, False, 64, 130), (0.0, True, 64, 130), (0.25, True, 61, 77)]
)
def test_mlp_on_weights_in_compute_dtype(parity, no_weight_copies, dtype, dropout, bias, hidden, inter):  # fmt: skip
    """Gate and down carry adapters, up has none: the stacked [e | u] output is written by one
    matmul per column block; with ``bias``, gate and down have biases."""
    tokens, r = 13, 5
    ws = [
        _weight(o, i, seed=k) for k, (o, i) in enumerate([(inter, hidden)] * 2 + [(hidden, inter)])
    ]
    ag, bg = _adapter(inter, hidden, r, 20)
    ad, bd = _adapter(hidden, inter, r, 21)
    master = {
        "x": torch.randn(tokens, hidden).requires_grad_(),
        "Ag": ag,
        "Bg": bg,
        "Ad": ad,
        "Bd": bd,
    }
    if bias:
        master["bg"] = (0.1 * torch.randn(inter)).requires_grad_()
        master["bd"] = (0.1 * torch.randn(hidden)).requires_grad_()

    def projections(x, Ag, Bg, Ad, Bd, bg=None, bd=None):
        g, u, d = (w.to(x.dtype) for w in ws)
        return (
            (g, LoRAWeights(Ag, Bg, 2.0, dropout), bg),
            (u, None),
            (d, LoRAWeights(Ad, Bd, 0.75, dropout), bd),
        )

    def ours(x, **t):
        torch.manual_seed(STEP_SEED)
        return lora_mlp(x, *projections(x, **t))

    def ref(x, **t):
        keeps = _keeps([x.shape, x.shape, (tokens, inter)], dropout)
        return lora_mlp_reference(x, *projections(x, **t), keeps=keeps)

    parity(ours, ref, master, dtype, torch.device("cpu"))
    # gate/up and down, each one direct forward and one direct backward
    assert no_weight_copies == {"forward": 2, "backward": 2}


def _slots(shapes, r=16, device="meta", dtype=torch.bfloat16):
    return [
        Slot(torch.empty(o, i, device=device, dtype=dtype), torch.empty(r, i, device=device),
             torch.empty(o, r, device=device), None, 2.0, 0.0, 0)
        for o, i in shapes
    ]  # fmt: skip


def test_traffic_model_keeps_the_copies_at_many_rows(monkeypatch):
    """Llama-3.1-8B shapes (meta tensors): at 4096 rows every group uses its weights as stored;
    at 8192 rows the folded gate/up and q/k/v groups move less by copying (the adapter's pass
    over the wide output costs more than the weight copy), and the wide down projection too."""
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "auto")
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", True)
    qkv = _slots([(4096, 4096), (1024, 4096), (1024, 4096)])
    gate_up = _slots([(14336, 4096), (14336, 4096)])
    down = _slots([(4096, 14336)])

    def direct(slots, rows, stacked):
        x = torch.empty(rows, slots[0].base.shape[1], device="meta", dtype=torch.bfloat16)
        layout, weights = lora_direct.plan_group(slots, x, stacked)
        assert (weights is not None) == layout.direct and not (layout.direct and layout.fold)
        return layout.direct

    assert direct(qkv, 4096, False) and direct(gate_up, 4096, True) and direct(down, 4096, False)
    assert not direct(gate_up, 8192, True) and not direct(down, 8192, False)
    assert not direct(qkv, 16384, False)
    fp32 = _slots([(64, 32), (64, 32)], dtype=torch.float32)  # a cast is needed: stacking is free
    assert not direct(fp32, 4, True)
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "1")  # TURBOTUNE_LORA_DIRECT=1
    assert direct(gate_up, 8192, True)
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "0")
    assert not direct(gate_up, 4096, True)


def test_plans_are_cached_per_source_and_follow_the_switches(monkeypatch):
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "auto")
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", True)
    slots = _slots([(16, 8), (16, 8)], r=2, device="cpu", dtype=torch.float32)
    x = torch.empty(4, 8)
    calls = []
    real = lora_direct._new_plan
    monkeypatch.setattr(lora_direct, "_new_plan", lambda *a: calls.append(1) or real(*a))
    first = lora_direct.plan_group(slots, x, True)[0]
    assert lora_direct.plan_group(slots, x, True)[0] is first and len(calls) == 1
    monkeypatch.setattr(lora_group, "FOLD_ADAPTERS", False)  # a run-time A/B switch
    lora_direct.plan_group(slots, x, True)
    assert len(calls) == 2
    other = _slots([(16, 8), (16, 8)], r=2, device="cpu", dtype=torch.bfloat16)
    assert lora_direct.plan_group(other, x, True)[1] is None  # a bf16 weight, fp32 compute


# ---- GPU: Llama-3.1-8B shapes at 4096 rows (the direct layout's regime), bf16 base ----


@pytest.mark.gpu
def test_direct_mlp_and_qkv_llama8b_bf16_gpu(parity, no_weight_copies):
    m, h, inter, kv, r = 4096, 4096, 14336, 1024, 16
    cuda = torch.device("cuda")
    mlp_w = [_weight(o, i, seed=k).to(cuda, torch.bfloat16)
             for k, (o, i) in enumerate([(inter, h), (inter, h), (h, inter)])]  # fmt: skip
    qkv_w = [_weight(o, h, seed=5 + k).to(cuda, torch.bfloat16) for k, o in enumerate((h, kv, kv))]
    master = {"x": torch.randn(m, h).requires_grad_()}
    for k, (o, i) in enumerate([(inter, h), (inter, h), (h, inter)]):
        master[f"A{k}"], master[f"B{k}"] = _adapter(o, i, r, seed=30 + k)

    def mlp(fn):
        def run(x, **t):
            projs = [(w, LoRAWeights(t[f"A{k}"], t[f"B{k}"], 2.0)) for k, w in enumerate(mlp_w)]
            return fn(x, *projs)

        return run

    parity(mlp(lora_mlp), mlp(lora_mlp_reference), master, torch.bfloat16, cuda)
    assert no_weight_copies == {"forward": 2, "backward": 2}

    def qkv(fn):
        def run(x, **t):
            projs = [(w, LoRAWeights(t[f"A{k}"][:, :h], t[f"B{k}"][: w.shape[0]], 2.0))
                     for k, w in enumerate(qkv_w)]  # fmt: skip
            return torch.cat(fn(x, *projs), dim=-1)

        return run

    parity(qkv(lora_qkv), qkv(lora_qkv_reference), master, torch.bfloat16, cuda)
    assert no_weight_copies == {"forward": 3, "backward": 3}
