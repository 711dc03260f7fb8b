"""Micro-benchmarks of the pieces of a fused step that are not the big GEMMs.

    python benchmarks/kernel_micro.py [--only attention,dequant]

* ``attention``: ``scaled_dot_product_attention`` forward+backward at the reference workload's
  attention shape (4 x 1024, 32 query / 8 KV heads, head 128, causal, bf16) with each SDPA
  backend, and with grouped KV heads passed as ``enable_gqa`` or repeated first (what
  transformers does when it cannot use ``enable_gqa``).
* ``dequant``: NF4 (double-quantized, blocksize 64) to bf16 of the Llama-3.1-8B projection
  shapes: turbotune's kernel vs bitsandbytes', as time and as achieved bandwidth (bytes read +
  written per second), against a device-to-device copy of the bf16 output for scale.

Times are CUDA-event medians over repeats after warm-up. Nothing here is a unit test.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import time_ms  # this folder (scripts run from here)


def _time_ms(fn, repeats: int = 20, warmup: int = 5, cold: bool = False) -> float:
    return time_ms(fn, repeats, warmup, cold)


def attention(batch: int = 4, seq: int = 1024, heads: int = 32, kv_heads: int = 8) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt, d = "cuda", torch.bfloat16, 128
    q = torch.randn(batch, heads, seq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn(batch, heads, seq, d, device=dev, dtype=dt)
    flops = 4 * batch * heads * seq * seq * d / 2 * 3.5  # causal; backward ~2.5x forward
    rep = heads // kv_heads
    print(f"== attention {batch}x{seq}, {heads}/{kv_heads} heads, d {d}, causal, bf16 fwd+bwd")
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for gqa in (True, False):

            def step(backend=backend, gqa=gqa):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    if gqa:
                        out = F.scaled_dot_product_attention(
                            q, k, v, is_causal=True, enable_gqa=True
                        )
                    else:
                        kk = k.repeat_interleave(rep, dim=1)
                        vv = v.repeat_interleave(rep, dim=1)
                        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                out.backward(grad)

            try:
                ms = _time_ms(step)
            except Exception as exc:  # a backend that does not take this shape
                print(
                    f"  {backend:20s} gqa={gqa!s:5s}  unavailable: {str(exc).splitlines()[0][:90]}"
                )
                continue
            print(
                f"  {backend:20s} gqa={gqa!s:5s}  {ms:7.3f} ms  x32 layers {32 * ms:6.1f} ms  "
                f"{flops / ms / 1e9:6.0f} TFLOP/s"
            )


def dequant() -> None:
    import bitsandbytes.functional as bnbf

    from turbotune.ops.nf4 import dequantize_nf4

    shapes = {
        "q/o": (4096, 4096),
        "k/v": (1024, 4096),
        "gate/up": (14336, 4096),
        "down": (4096, 14336),
    }
    print("== NF4 (double quant, blocksize 64) -> bf16, L2 cold")
    total = {"turbotune": 0.0, "bitsandbytes": 0.0, "copy": 0.0}
    per_layer = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    for name, shape in shapes.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        out = torch.empty_like(w)
        ours = _time_ms(partial(dequantize_nf4, packed, state, out=out), repeats=30, cold=True)
        theirs = _time_ms(partial(bnbf.dequantize_4bit, packed, state, out=out), 30, cold=True)
        copy = _time_ms(partial(out.copy_, w), repeats=30, cold=True)
        ref = bnbf.dequantize_4bit(packed, state).to(torch.bfloat16)
        diff = (dequantize_nf4(packed, state, out=out) - ref).abs().max().item()
        moved = w.numel() * 2 + w.numel() / 2 + w.numel() / 64  # write bf16, read nibbles+scales
        for key, ms in (("turbotune", ours), ("bitsandbytes", theirs), ("copy", copy)):
            total[key] += per_layer[name] * ms
        print(
            f"  {name:8s} {shape!s:14s} turbotune {ours:6.3f} ms ({moved / ours / 1e6:5.0f} GB/s)"
            f"  bnb {theirs:6.3f} ms ({moved / theirs / 1e6:5.0f} GB/s)"
            f"  bf16 copy {copy:6.3f} ms  max|diff| {diff:.1e}"
        )
    print(
        "  per step (32 layers, forward + backward): "
        + ", ".join(f"{k} {2 * 32 * v:.1f} ms" for k, v in total.items())
    )


def lora_t() -> None:
    """``t = x A^T`` as the folded LoRA groups run it: into a column block of ``[x | T]``."""
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    for m in (4096, 8192):
        print(f"== t = x A^T, {m} tokens, L2 cold: contiguous output vs a column block of [x | T]")
        for r in (16, 32, 48):
            x, a = torch.randn(m, 4096, **bf), torch.randn(r, 4096, **bf)
            wide = torch.empty(m, 4096 + 64, **bf)
            block = wide[:, 4096 : 4096 + r]
            plain = _time_ms(partial(torch.mm, x, a.t()), repeats=30, cold=True)
            into = _time_ms(partial(torch.mm, x, a.t(), out=block), repeats=30, cold=True)
            via = _time_ms(lambda x=x, a=a, b=block: b.copy_(torch.mm(x, a.t())), 30, cold=True)
            names = []
            for fn in (partial(torch.mm, x, a.t()), partial(torch.mm, x, a.t(), out=block)):
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]
                ) as prof:
                    fn()
                    torch.cuda.synchronize()
                names.append(
                    "/".join(
                        e.key[:48]
                        for e in prof.key_averages()
                        if "nvjet" in e.key or "gemm" in e.key
                    )
                )
            print(
                f"  r={r:2d}  contiguous {1e3 * plain:6.1f} us  into [x|T] {1e3 * into:6.1f} us"
                f"  contiguous+copy {1e3 * via:6.1f} us   kernels: {names[0]} | {names[1]}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="attention,dequant")
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        {"attention": attention, "dequant": dequant, "lora_t": lora_t}[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
