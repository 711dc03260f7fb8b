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


def _base(kind: str, out_f: int, in_f: int, seed: int):
    """A frozen base weight source and its dense fp32 value.

    ``dense``: an fp32 tensor rounded to bf16 (so bf16 runs see the same W); ``nf4``: a bnb
    ``Params4bit`` with double quantization and bf16 storage; ``fp4``: a bnb ``Linear4bit``.
    """
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).bfloat16().float()
    if kind == "dense":
        return w, w
    if kind == "nf4":
        # bnb can store an even number of bytes only as bf16.
        storage = torch.bfloat16 if (out_f * in_f + 1) // 2 % 2 == 0 else torch.uint8
        source = bnb.nn.Params4bit(
            w, quant_type="nf4", compress_statistics=True, quant_storage=storage
        ).to("cpu")  # moving to a device is what quantizes
    else:
        source = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="fp4")
        source.weight = bnb.nn.Params4bit(w, quant_type="fp4", module=source)
        source = source.to("cpu")
    return source, dense_weight(source, torch.float32)


def _adapter(out_f: int, in_f: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) / r**0.5).requires_grad_()
    return {"A": a, "B": b}


def _ref_keeps(n: int, shapes, ps) -> list[torch.Tensor | None]:
    """The masks the fused op draws: same step seed, projection ``j`` uses ``seed + j``."""
    torch.manual_seed(STEP_SEED)
    seed = dropout_seed()
    return [
        dropout_keep(shape, p, seed + j, torch.device("cpu")) if p > 0 else None
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,dropout", [("dense", 0.0), ("nf4", 0.0), ("nf4", 0.2)])
def test_lora_qkv_parity(parity, dtype, kind, dropout):
    """GQA shapes (k, v narrower than q); k has no adapter; v has a bias."""
    tokens, hidden, r = 13, 123, 5
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
    "activation,kind,dropout",
    [
        ("silu", "dense", 0.0),
        ("silu", "nf4", 0.25),
        ("gelu_tanh", "fp4", 0.0),
        ("gelu", "nf4", 0.1),
    ],
)
def test_lora_mlp_parity(parity, dtype, activation, kind, dropout):
    """Gate and down carry adapters, up has none."""
    tokens, hidden, inter, r = 13, 123, 77, 5
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

    def ours(x, Ag, Bg, Ad, Bd):
        torch.manual_seed(STEP_SEED)
        return lora_mlp(
            x,
            (gate[0], LoRAWeights(Ag, Bg, 2.0, dropout)),
            (up[0], None),
            Projection(down[0], LoRAWeights(Ad, Bd, 0.75, dropout)),
            activation=activation,
        )

    def ref(x, Ag, Bg, Ad, Bd):
        keeps = _ref_keeps(3, [x.shape, x.shape, (tokens, inter)], [dropout] * 3)
        return lora_mlp_reference(
            x,
            (gate[1], LoRAWeights(Ag, Bg, 2.0, dropout)),
            (up[1], None),
            (down[1], LoRAWeights(Ad, Bd, 0.75, dropout)),
            activation=activation,
            keeps=keeps,
        )

    parity(ours, ref, master, dtype, torch.device("cpu"))
