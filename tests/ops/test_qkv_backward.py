"""The attention block's backward without its two extra memory passes.

A: the rotary backward writes dq, dk and dv into one buffer (``ops/rope_qkv.py``) and the q/k/v
group takes it as ``[dq | dk | dv]`` (``lora_group.adjacent_columns``) instead of a cat.
B: o_proj takes the wide backward ``[dy | g] [W; A]`` when its ``dy`` has spare columns
(``lora_fold.wide_fits``). Each is checked against the eager reference (forward and every
gradient), and the patched attention block is checked with both on against both off.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from turbotune.ops import (
    lora_adapter_first,
    lora_direct,
    lora_fold,
    reference,
    rope_qkv,
    spare_columns,
)
from turbotune.ops.lora import LoRAWeights, lora_linear
from turbotune.ops.lora_group import adjacent_columns
from turbotune.ops.rope_qkv import apply_rotary_qkv

lora_mod = importlib.import_module("turbotune.ops.lora")

# (B, Hq, Hk, S, D): typical GQA, prime heads and half-dim (23), tiny, half-dim above 32.
SHAPES = [(2, 4, 2, 8, 64), (1, 5, 3, 7, 46), (1, 1, 1, 1, 2), (2, 3, 1, 4, 66)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _qkv_master(batch, n_q, n_k, seq, dim, seed=0):
    """q, k, v as the fused attention has them: [B, S, H*D] rows, viewed as [B, H, S, D]."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq).repeat(batch, 1) * 3 % max(seq, 1)
    cos, sin = reference.rotary_cos_sin(_inv_freq(dim), positions)
    return {
        "q": torch.randn(batch, seq, n_q * dim, generator=gen).requires_grad_(),
        "k": torch.randn(batch, seq, n_k * dim, generator=gen).requires_grad_(),
        "v": torch.randn(batch, seq, n_k * dim, generator=gen).requires_grad_(),
        "cos": cos,
        "sin": sin,
    }


def _heads(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], -1, dim).transpose(1, 2)


def _joined(impl, dim):
    """One output (q heads, k heads, v heads) so one grad_output drives all three gradients."""

    def fn(q, k, v, cos, sin):
        return torch.cat(impl(_heads(q, dim), _heads(k, dim), _heads(v, dim), cos, sin), dim=1)

    return fn


def _eager(q, k, v, cos, sin):
    return (*reference.apply_rotary(q, k, cos, sin), v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotary_qkv_matches_reference(shape, dtype, device, parity):
    dim = shape[-1]
    parity(_joined(apply_rotary_qkv, dim), _joined(_eager, dim), _qkv_master(*shape), dtype, device)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_rotary_qkv_gradients_are_adjacent_columns_of_one_buffer(shape, device):
    """What autograd hands the q/k/v group: [M, n_i] views that adjacent_columns joins, equal to
    the cat of the separate gradients of the two-tensor rotary."""
    batch, n_q, n_k, seq, dim = shape
    m = _qkv_master(*shape)
    leaves = [m[n].detach().to(device).requires_grad_() for n in ("q", "k", "v")]
    cos, sin = m["cos"].to(device), m["sin"].to(device)
    outs = apply_rotary_qkv(*(_heads(t, dim) for t in leaves), cos, sin)
    assert outs[0].grad_fn.name() == "RotaryQKVFunctionBackward"
    assert outs[0].stride() == _heads(leaves[0], dim).stride()  # SDPA sees the layout of today
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
    dys = [g.reshape(batch * seq, -1) for g in torch.autograd.grad(outs, leaves, grads)]
    joined = adjacent_columns(dys)
    assert joined is not None, [(d.data_ptr(), d.stride()) for d in dys]
    assert joined.shape == (batch * seq, (n_q + 2 * n_k) * dim)
    ref_leaves = [t.detach().requires_grad_() for t in leaves]
    want = reference.apply_rotary(*(_heads(t, dim) for t in ref_leaves[:2]), cos, sin)
    ref = torch.autograd.grad((*want, _heads(ref_leaves[2], dim)), ref_leaves, grads)
    cat = torch.cat([g.reshape(batch * seq, -1) for g in ref], dim=1)
    diff = (joined - cat).abs()
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_rotary_qkv_mixed_dtypes_fall_back_to_separate_gradients(device):
    """dv in another dtype than dq: no shared buffer, each gradient in its own dtype."""
    m = _qkv_master(1, 2, 1, 3, 8)
    q, k = (m[n].detach().to(device).requires_grad_() for n in ("q", "k"))
    v = m["v"].detach().to(device=device, dtype=torch.float64).requires_grad_()
    outs = apply_rotary_qkv(_heads(q, 8), _heads(k, 8), _heads(v, 8), m["cos"], m["sin"])
    (outs[0].sum() + outs[1].sum() + 2 * outs[2].sum()).backward()
    assert v.grad.dtype == torch.float64 and torch.equal(v.grad, torch.full_like(v, 2.0))
    want_q, _ = reference.apply_rotary(_heads(q, 8), _heads(k, 8), m["cos"], m["sin"])
    dq = torch.autograd.grad(want_q.sum(), q)[0]
    torch.testing.assert_close(q.grad, dq, atol=1e-5, rtol=1e-5)


# ---- adjacent_columns ----


def test_adjacent_columns_joins_adjacent_blocks():
    buf = torch.randn(6, 10)
    parts = [buf[:, 0:3], buf[:, 3:4], buf[:, 4:9]]
    joined = adjacent_columns(parts)
    assert joined is not None and joined.shape == (6, 9) and joined.data_ptr() == buf.data_ptr()
    assert torch.equal(joined, torch.cat(parts, dim=1))
    inner = buf[1:4]  # a row slice of a wider buffer: same row stride, an offset start
    assert torch.equal(adjacent_columns([inner[:, 2:5], inner[:, 5:10]]), inner[:, 2:10])
    one_row = torch.randn(1, 7)
    assert torch.equal(adjacent_columns([one_row[:, :3], one_row[:, 3:]]), one_row)


def _negatives():
    buf = torch.randn(6, 10)
    other = torch.randn(6, 10)
    flat = torch.randn(60)
    return {
        "separate tensors": [torch.randn(6, 3), torch.randn(6, 4)],
        "gap between": [buf[:, 0:3], buf[:, 4:6]],
        "wrong order": [buf[:, 3:6], buf[:, 0:3]],
        "overlapping": [buf[:, 0:4], buf[:, 3:6]],
        "rows differ": [buf[:3, 0:3], buf[:3, 3:6], buf[:2, 6:8]],
        "row strides differ": [buf[:, 0:3], buf.as_strided((6, 2), (9, 1), 3)],
        "column stride": [buf[:, 0:3], buf[:, 3:9:2]],
        "transposed": [buf.t()[:, 0:2], buf.t()[:, 2:4]],
        "dtype differs": [buf[:, 0:5], buf[:, 5:10].view(torch.int32)],
        "other storage": [buf[:, 0:5], other[:, 5:10]],
        "1-D": [flat[0:3], flat[3:6]],
        "past the row": [flat[:20].view(2, 10)[:, 0:6], flat.as_strided((2, 6), (10, 1), 6)],
        "empty": [buf[:0, 0:3], buf[:0, 3:6]],
    }


@pytest.mark.parametrize("case", list(_negatives()))
def test_adjacent_columns_rejects(case):
    parts = _negatives()[case]
    assert adjacent_columns(parts) is None, case


# ---- o_proj: the wide backward at run time ----


class _GradWithRoom(torch.autograd.Function):
    """Identity whose backward hands on the gradient in a buffer with spare columns behind it,
    offered as the add-norm backward offers its output (``spare_columns.rows_with_room``)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        rows = spare_columns.rows_with_room(*dy.shape, dy.dtype, dy.device)
        return rows.copy_(dy)


@pytest.fixture
def stacked_bases(monkeypatch):
    """Plain weights through the dequantizing layouts (as NF4 bases go), not used as stored."""
    monkeypatch.setattr(lora_direct, "DIRECT_BASES", "0")
    spare_columns.reset()
    yield
    spare_columns.reset()


def _learn_room(columns: int) -> None:
    """A failed claim tells the producers how many spare columns to allocate."""
    assert spare_columns.claim(torch.zeros(2, 2), columns) is None
    assert spare_columns.wanted() >= columns


# (M, H, r): typical, prime rows and width, tiny (2 rows: a 1-row view has no row stride to
# match, so spare_columns never hands its room out).
OPROJ_SHAPES = [(16, 32, 4), (13, 23, 3), (2, 2, 1)]


def _o_proj_master(m, h, r, seed, b_scale):
    """fp32 leaves of an o_proj ``[m, h] -> [h, h]`` with a rank-``r`` adapter; ``B`` times
    ``b_scale`` (``None``: unscaled)."""
    gen = torch.Generator().manual_seed(seed)
    master = {
        "x": torch.randn(m, h, generator=gen).requires_grad_(),
        "weight": torch.randn(h, h, generator=gen) / h**0.5,
        "a": (torch.randn(r, h, generator=gen) / h**0.5).requires_grad_(),
    }
    b = torch.randn(h, r, generator=gen)
    master["b"] = (b if b_scale is None else b * b_scale).requires_grad_()
    return master


def _o_proj_ours(x, weight, a, b):
    return _GradWithRoom.apply(lora_linear(x, weight, LoRAWeights(a, b, 2.0)))


def _o_proj_ref(x, weight, a, b):
    return reference.lora_linear_reference(x, weight, LoRAWeights(a, b, 2.0))


@pytest.mark.parametrize("wide", [True, False], ids=["wide-at-runtime", "old-path"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OPROJ_SHAPES, ids=str)
def test_o_proj_backward_matches_reference(
    shape, dtype, wide, device, parity, stacked_bases, monkeypatch
):
    monkeypatch.setattr(lora_fold, "WIDE_WHEN_ROOM", wide)
    m, h, r = shape
    master = _o_proj_master(m, h, r, seed=2, b_scale=None)
    _learn_room(8)
    before = spare_columns.claims
    parity(_o_proj_ours, _o_proj_ref, master, dtype, device)
    # The wide path claims dy's spare columns for g; the old path leaves them alone.
    assert spare_columns.claims - before == (1 if wide else 0)


def test_o_proj_takes_old_path_without_room(stacked_bases):
    """A dy without spare columns (or too few) keeps dx = dy W; dx += g A, and equal results."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    weight = torch.randn(16, 16, generator=gen)
    a = torch.randn(20, 16, generator=gen, requires_grad=True)  # rank 20: 24 padded columns
    b = torch.randn(16, 20, generator=gen, requires_grad=True)
    calls = []
    real = lora_mod.wide_fits
    lora_mod.wide_fits = lambda layout, dy: calls.append(real(layout, dy)) or calls[-1]
    try:
        grads = {}
        for label, room in (("plain", None), ("too few", 16), ("room", 24)):
            spare_columns.reset()
            if room:
                _learn_room(room)
            y = lora_linear(x, weight, LoRAWeights(a, b, 0.5))
            y = _GradWithRoom.apply(y) if room else y
            grads[label] = torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
    finally:
        lora_mod.wide_fits = real
    assert calls == [False, False, True]
    for label in ("too few", "room"):
        for name, got, want in zip("xab", grads[label], grads["plain"]):
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4 * want.abs().max().item(), f"{label} d{name}: max diff {diff:.3e}"


# ---- o_proj forward: the adapter term first, the base GEMM adding onto it ----


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OPROJ_SHAPES, ids=str)
def test_adapter_first_forward_matches_reference(
    shape, dtype, bias, device, parity, stacked_bases, monkeypatch
):
    """The lone projection with ``y = s t B^T (+ b)`` first and ``y += x W^T`` in the GEMM:
    output and every gradient (x, A, B, bias) vs the eager reference; the path really runs."""
    m, h, r = shape
    gen = torch.Generator().manual_seed(6)
    master = {
        "x": torch.randn(m, h, generator=gen).requires_grad_(),
        "weight": torch.randn(h + 3, h, generator=gen) / h**0.5,  # out != in too
        "a": (torch.randn(r, h, generator=gen) / h**0.5).requires_grad_(),
        "b": torch.randn(h + 3, r, generator=gen).requires_grad_(),
        "bias": torch.randn(h + 3, generator=gen).requires_grad_() if bias else None,
    }
    ran = []
    real = lora_adapter_first.adapter_first_forward
    monkeypatch.setattr(
        lora_adapter_first, "adapter_first_forward", lambda *a: ran.append(1) or real(*a)
    )

    def ours(x, weight, a, b, bias):
        return lora_linear(x, weight, LoRAWeights(a, b, 0.5), bias)

    def ref(x, weight, a, b, bias):
        return reference.lora_linear_reference(x, weight, LoRAWeights(a, b, 0.5), bias)

    parity(ours, ref, master, dtype, device)
    assert len(ran) == 1  # the check runs ours once (and the reference twice)


def test_adapter_first_off_and_on_agree(stacked_bases, monkeypatch):
    """The flag switches the order; both orders give the same output and gradients in fp32."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 24, generator=gen, requires_grad=True)
    weight = torch.randn(24, 24, generator=gen)
    a = torch.randn(4, 24, generator=gen, requires_grad=True)
    b = torch.randn(24, 4, generator=gen, requires_grad=True)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(lora_adapter_first, "ENABLED", on)
        y = lora_linear(x, weight, LoRAWeights(a, b, 2.0))
        runs[on] = [y, *torch.autograd.grad(y, (x, a, b), torch.ones_like(y))]
    for name, got, want in zip(["y", "dx", "dA", "dB"], runs[True], runs[False]):
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5 * want.abs().max().item(), f"{name}: max abs diff {diff:.3e}"


# ---- the patched attention block, both fast paths on vs off ----


def _block_grads(model, ids, labels):
    """Loss, the gradient of the input embeddings, and every LoRA gradient."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    return loss.detach(), embeds.grad, grads


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_block_new_paths_match_old(family, device, stacked_bases, monkeypatch):
    """Fused Llama / Qwen3 (qk-norms between the projections and the rotary) with the one-buffer
    rotary backward and o_proj's wide backward on vs off: equal loss and gradients (x and every
    LoRA A/B), and the fast paths really run where they apply (Llama) and not where they do not
    (Qwen3's dq, dk come from the qk-norms: not adjacent, the group concatenates)."""
    from tests.patches.test_fused_parity import data, tiny_model, with_lora

    from turbotune.patches import KINDS, apply_patches

    if device.type != "cpu":
        pytest.skip("CPU interpreter test (the GPU test below runs real shapes)")
    torch.set_num_threads(1)
    n_layers = 1
    # fp32, 4/2 heads of 16 (in == out for o_proj, as at Llama-8B), LoRA r 4 on every linear.
    base = with_lora(tiny_model(family, num_hidden_layers=n_layers, head_dim=16))
    ids, labels = data(1, batch=1, seq=8)[0]
    joined, fits = [], []
    real_join, real_fits = lora_mod.adjacent_columns, lora_mod.wide_fits
    runs = {}
    for on in (False, True):
        model = copy.deepcopy(base)
        patches = apply_patches(model, KINDS)  # the fused layer as trained
        monkeypatch.setattr(rope_qkv, "ENABLED", on)
        monkeypatch.setattr(lora_fold, "WIDE_WHEN_ROOM", on)
        spare_columns.reset()
        _learn_room(16)  # what the first step teaches the norms (q/k/v's padded rank 12)
        joined.clear(), fits.clear()

        def spy_join(dys, out=joined):
            result = real_join(dys)
            out.append(result is not None)
            return result

        def spy_fits(layout, dy, out=fits):
            result = real_fits(layout, dy)
            out.append(result)
            return result

        monkeypatch.setattr(lora_mod, "adjacent_columns", spy_join)
        monkeypatch.setattr(lora_mod, "wide_fits", spy_fits)
        runs[on] = (_block_grads(model, ids, labels), list(joined), list(fits))
        monkeypatch.setattr(lora_mod, "adjacent_columns", real_join)
        monkeypatch.setattr(lora_mod, "wide_fits", real_fits)
        patches.undo()
    (old, old_joined, old_fits), (new, new_joined, new_fits) = runs[False], runs[True]
    assert old_joined == [False] * n_layers and not any(old_fits)
    assert new_joined == [family == "llama"] * n_layers, new_joined
    assert new_fits == [True] * n_layers, new_fits  # o_proj of each layer
    torch.testing.assert_close(new[0], old[0], rtol=1e-6, atol=1e-6)
    pairs = [("d inputs_embeds", new[1], old[1])]
    pairs += [(n, new[2][n], old[2][n]) for n in old[2]]
    assert len(pairs) == 1 + n_layers * 7 * 2  # q, k, v, o, gate, up, down: A and B each
    for name, got, want in pairs:
        diff = (got - want).abs()
        bound = 1e-5 * max(1.0, want.abs().max().item())
        assert diff.max() <= bound, f"{name}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


# ---- real shapes (H100) ----


@pytest.mark.gpu
def test_gpu_rotary_qkv_real_shape(parity):
    """Llama-8B attention: 32 query and 8 key-value heads of 128, 2 x 2048 tokens, bf16."""
    dim = 128
    master = _qkv_master(2, 32, 8, 2048, dim)
    parity(
        _joined(apply_rotary_qkv, dim),
        _joined(_eager, dim),
        master,
        torch.bfloat16,
        torch.device("cuda"),
    )


@pytest.mark.gpu
def test_gpu_o_proj_wide_real_shape(parity, stacked_bases):
    """o_proj at Llama-8B shape, 4096 tokens, r 16: the wide backward vs the fp32 reference."""
    master = _o_proj_master(4096, 4096, 16, seed=4, b_scale=0.1)
    _learn_room(48)
    before = spare_columns.claims
    parity(_o_proj_ours, _o_proj_ref, master, torch.bfloat16, torch.device("cuda"))
    assert spare_columns.claims - before == 1  # the wide path ran


@pytest.mark.gpu
def test_gpu_attention_chain_one_buffer_matches_cat(stacked_bases, monkeypatch):
    """q/k/v (one fused LoRA call, folded) -> rotary -> SDPA -> o_proj at 4 x 1024 tokens, bf16:
    the one-buffer rotary backward on vs off gives the same gradients (to within SDPA's own
    run-to-run noise), and the q/k/v group really takes the buffer as its dy."""
    import torch.nn.functional as F

    from turbotune.ops.lora import Projection, lora_projections

    monkeypatch.setattr(lora_fold, "WIDE_WHEN_ROOM", False)
    batch, seq, hidden, n_q, n_k, dim, r = 4, 1024, 4096, 32, 8, 128, 16
    gen = torch.Generator().manual_seed(5)

    def proj(out_f, in_f):
        w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).cuda().bfloat16()
        a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).cuda().requires_grad_()
        b = (torch.randn(out_f, r, generator=gen) * 0.1).cuda().requires_grad_()
        return Projection(w, LoRAWeights(a, b, 2.0))

    qkv = [proj(n_q * dim, hidden), proj(n_k * dim, hidden), proj(n_k * dim, hidden)]
    o_proj = proj(hidden, n_q * dim)
    params = [t for p in (*qkv, o_proj) for t in (p.lora.A, p.lora.B)]
    x = torch.randn(batch, seq, hidden, generator=gen).cuda().bfloat16().requires_grad_()
    dy = torch.randn(batch, seq, hidden, generator=gen).cuda().bfloat16()
    positions = torch.arange(seq).repeat(batch, 1)
    cos, sin = (t.cuda().bfloat16() for t in reference.rotary_cos_sin(_inv_freq(dim), positions))
    joined = []
    real_join = lora_mod.adjacent_columns
    monkeypatch.setattr(
        lora_mod, "adjacent_columns", lambda d: joined.append(real_join(d)) or joined[-1]
    )

    def run(on: bool):
        monkeypatch.setattr(rope_qkv, "ENABLED", on)
        q, k, v = lora_projections(x, qkv)
        q, k, v = (t.view(batch, seq, -1, dim).transpose(1, 2) for t in (q, k, v))
        if on:
            q, k, v = apply_rotary_qkv(q, k, v, cos, sin)
        else:
            from turbotune.ops.rope import apply_rotary

            q, k = apply_rotary(q, k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = lora_projections(out.transpose(1, 2).reshape(batch, seq, -1), [o_proj])[0]
        grads = torch.autograd.grad(y, [x, *params], dy)
        return [y.detach(), *grads]

    old, again, new = run(False), run(False), run(True)
    assert [j is not None for j in joined] == [False, False, True]
    for i, (got, want, noise) in enumerate(zip(new, old, again)):
        bound = 2 * (noise.float() - want.float()).abs().max().item()
        bound += torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
        diff = (got.float() - want.float()).abs()
        assert diff.max().item() <= bound, (
            f"tensor {i}: max abs diff {diff.max():.3e} (bound {bound:.3e}), mean {diff.mean():.3e}"
        )
