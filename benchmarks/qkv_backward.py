"""The attention block's backward: q/k/v gradient cat and o_proj's rank update, old vs new.

    python benchmarks/qkv_backward.py [--batch 4] [--seq 1024] [--rank 16]

* ``pieces`` (Llama-3.1-8B attention: 32 query / 8 key-value heads of 128, bf16):
  - rotary backward + ``torch.cat(dq, dk, dv)`` (old) vs ``rope_qkv.rotary_qkv_backward``
    writing all three into one buffer (new), from gradients laid out as SDPA returns them;
  - o_proj's input gradient: ``dx = dy W; dx += g A`` (old) vs ``[dy | g] [W; A]`` with ``g``
    in dy's spare columns (new), for a dense ``W``.
  - o_proj's output: ``y = x W^T; y += s t B^T`` (old) vs ``y = s t B^T; y += x W^T`` in the
    GEMM's epilogue (new, ``lora_adapter_first``).
* ``block``: q/k/v (NF4, one fused LoRA call) -> rotary -> SDPA (causal, GQA) -> o_proj (NF4
  LoRA), forward + backward with the flags ``rope_qkv.ENABLED`` (A),
  ``lora_fold.WIDE_WHEN_ROOM`` (B) and ``lora_adapter_first.ENABLED`` (C) added one by one
  (o_proj's output gradient arrives with spare columns, as the add-norm backward hands it on).
  Also prints the layouts SDPA reads and returns, and which paths ran.

Times are CUDA-event medians, L2 evicted before each repeat (block: not evicted). Nothing here is
a unit test. Under a minute on an H100.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import time_ms  # this folder (scripts run from here)

from turbotune.ops import lora as lora_mod
from turbotune.ops import lora_adapter_first, lora_fold, rope_qkv, spare_columns
from turbotune.ops.lora import LoRAWeights, Projection, lora_linear, lora_projections
from turbotune.ops.reference import rotary_cos_sin
from turbotune.ops.rope import apply_rotary, rotary_backward

HQ, HK, D, HIDDEN = 32, 8, 128, 4096
# (rope_qkv.ENABLED, lora_fold.WIDE_WHEN_ROOM, lora_adapter_first.ENABLED)
VARIANTS = {
    "off": (False, False, False),
    "A": (True, False, False),
    "A+B": (True, True, False),
    "A+B+C": (True, True, True),
}


def _tables(batch: int, seq: int):
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = rotary_cos_sin(inv_freq, torch.arange(seq).repeat(batch, 1))
    return cos.cuda().bfloat16(), sin.cuda().bfloat16()


def _bshd(batch: int, seq: int, heads: int) -> torch.Tensor:
    """A gradient as SDPA returns it for HF's transposed q: [B, H, S, D], [B, S, H, D] in memory."""
    return torch.randn(batch, seq, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def pieces(batch: int, seq: int, rank: int) -> None:
    m = batch * seq
    cos, sin = _tables(batch, seq)
    dq_rot, dk_rot, dv = _bshd(batch, seq, HQ), _bshd(batch, seq, HK), _bshd(batch, seq, HK)

    def old():
        dq, dk = rotary_backward(dq_rot, dk_rot, cos, sin)
        rows = [t.transpose(1, 2).reshape(m, -1) for t in (dq, dk, dv)]
        return torch.cat(rows, dim=1)

    def new():
        grads = rope_qkv.rotary_qkv_backward(dq_rot, dk_rot, dv, cos, sin)
        rows = [t.transpose(1, 2).reshape(m, -1) for t in grads]
        return lora_mod.adjacent_columns(rows)

    same = torch.equal(old(), new())
    t_old, t_new = time_ms(old), time_ms(new)
    print(f"== {m} tokens, {HQ}/{HK} heads of {D}, bf16 (L2 evicted); same dy: {same}")
    print(f"  rotary bwd + cat (old)      {1000 * t_old:8.1f} us")
    print(
        f"  rotary bwd into one buffer  {1000 * t_new:8.1f} us   saves {1000 * (t_old - t_new):.1f}"
    )

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    a = torch.randn(rank, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    rp = -(-rank // 8) * 8
    dyg = torch.randn(m, HIDDEN + rp, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy, g = dyg[:, :HIDDEN], dyg[:, HIDDEN : HIDDEN + rank]
    wa = torch.cat([w, a, torch.zeros(rp - rank, HIDDEN, device="cuda", dtype=w.dtype)])

    def old_dx():
        dx = torch.mm(dy, w)
        return dx.addmm_(g, a)

    x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    t = torch.randn(m, rank, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(HIDDEN, rank, device="cuda", dtype=torch.bfloat16, generator=gen)
    nothing = torch.zeros(1, device="cuda", dtype=torch.bfloat16)

    def old_y():
        return torch.mm(x, w.t()).addmm_(t, b.t(), alpha=2.0)

    def new_y():
        return torch.addmm(nothing, t, b.t(), beta=0, alpha=2.0).addmm_(x, w.t())

    t_old, t_new = time_ms(old_y), time_ms(new_y)
    print(f"  o_proj y = x W^T; += s t B^T  {1000 * t_old:8.1f} us")
    print(
        f"  o_proj y = s t B^T; += x W^T  {1000 * t_new:8.1f} us   saves {1000 * (t_old - t_new):.1f}"
    )
    t_old, t_new = time_ms(old_dx), time_ms(lambda: torch.mm(dyg, wa))
    print(f"  o_proj dx = dy W; += g A     {1000 * t_old:8.1f} us")
    print(
        f"  o_proj dx = [dy | g] [W; A]  {1000 * t_new:8.1f} us   saves {1000 * (t_old - t_new):.1f}"
    )


class _GradWithRoom(torch.autograd.Function):
    """Identity; its backward hands on the gradient with spare columns, as the add-norm does."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        n_cols = dy.shape[-1]
        rows = spare_columns.rows_with_room(dy.numel() // n_cols, n_cols, dy.dtype, dy.device)
        return rows.copy_(dy.reshape(-1, n_cols)).view(dy.shape)


def _nf4(out_f: int, in_f: int, rank: int, gen: torch.Generator) -> Projection:
    import bitsandbytes as bnb

    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to("cuda", torch.bfloat16)
    base = bnb.nn.Params4bit(
        w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16
    ).to("cuda")
    a = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).cuda().requires_grad_()
    b = (torch.randn(out_f, rank, generator=gen) * 0.01).cuda().requires_grad_()
    return Projection(base, LoRAWeights(a, b, 2.0))


def block(batch: int, seq: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = [_nf4(HQ * D, HIDDEN, rank, gen), _nf4(HK * D, HIDDEN, rank, gen)]
    qkv.append(_nf4(HK * D, HIDDEN, rank, gen))
    o_proj = _nf4(HIDDEN, HQ * D, rank, gen)
    x = torch.randn(batch, seq, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(batch, seq, HIDDEN, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(batch, seq)
    seen = {}

    def step():
        q, k, v = lora_projections(x, qkv)
        q, k, v = (t.view(batch, seq, -1, D).transpose(1, 2) for t in (q, k, v))
        if rope_qkv.ENABLED:
            q, k, v = rope_qkv.apply_rotary_qkv(q, k, v, cos, sin)
        else:
            q, k = apply_rotary(q, k, cos, sin)
        seen["q"] = q.stride()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = lora_linear(out.transpose(1, 2).reshape(batch, seq, -1), *o_proj)
        _GradWithRoom.apply(y).backward(dy)

    real_join, real_fits = lora_mod.adjacent_columns, lora_mod.wide_fits
    lora_mod.adjacent_columns = lambda d: seen.__setitem__("join", real_join(d)) or seen["join"]
    lora_mod.wide_fits = lambda lay, d: seen.__setitem__("fits", real_fits(lay, d)) or seen["fits"]
    real_bwd = rope_qkv.rotary_qkv_backward

    def spy_bwd(dq_rot, *rest):
        seen["dq_rot"] = dq_rot.stride()
        return real_bwd(dq_rot, *rest)

    rope_qkv.rotary_qkv_backward = spy_bwd
    spare_columns.reset()
    spare_columns.claim(torch.zeros(2, 2, device="cuda"), 48)  # what the norms learn in a step
    times = {}
    print(f"== attention block fwd+bwd (NF4 q/k/v + o_proj, r {rank}), {batch} x {seq} tokens")
    try:
        for name, (a_on, b_on, c_on) in VARIANTS.items():
            rope_qkv.ENABLED, lora_fold.WIDE_WHEN_ROOM, lora_adapter_first.ENABLED = (
                a_on,
                b_on,
                c_on,
            )
            seen.clear()
            times[name] = time_ms(step, 20, cold=False)
            print(f"  {name:10s} {times[name]:.3f} ms, saves {1000 * (times['off'] - times[name]):6.1f} us"
                  f" | q for SDPA {seen['q']}, dq_rot from SDPA {seen.get('dq_rot', '-')}, "
                  f"dy joined {seen.get('join') is not None}, o_proj wide {seen.get('fits')}")  # fmt: skip
    finally:
        rope_qkv.ENABLED = lora_fold.WIDE_WHEN_ROOM = lora_adapter_first.ENABLED = True
        lora_mod.adjacent_columns, lora_mod.wide_fits = real_join, real_fits
        rope_qkv.rotary_qkv_backward = real_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    pieces(args.batch, args.seq, args.rank)
    block(args.batch, args.seq, args.rank)


if __name__ == "__main__":
    main()
