"""Residual add + RMSNorm fused (``ops/add_norm.py``) vs the unfused kernels, on one GPU.

    python benchmarks/add_norm.py [--tokens 4096] [--hidden 4096] [--multiplier 0.22]

Rows, at ``[tokens, hidden]`` bf16 (frozen norm weight, as under LoRA, unless noted):

* ``forward``: ``s = r + h`` (torch) then the RMSNorm kernel (5 tensor passes) vs one kernel
  writing ``s`` and ``y`` (4 passes).
* ``backward``: the RMSNorm backward kernel then ``ds += dx`` (6 passes) vs one kernel
  ``d = ds + rmsnorm_backward(dy)`` (4 passes); ``+dw`` with the weight gradient.
* ``fwd+bwd autograd``: the whole op through autograd, as a decoder layer runs it.

A layer runs one ``forward`` and two ``backward`` (both norms' gradient sums are fused). Each
row also checks that both paths give bit-equal results. Times are CUDA-event medians with L2
evicted before each repeat; bandwidth counts the fused kernel's bytes. About 20 s on an H100.
"""

from __future__ import annotations

import argparse

import torch
from timing import time_ms  # this folder (scripts run from here)

from turbotune.ops.add_norm import add_norm_backward, add_rms_norm, add_rms_norm_forward
from turbotune.ops.rms_norm import rms_norm, rms_norm_backward, rms_norm_forward


def _row(name: str, unfused, fused, passes: int, nbytes: int, equal: bool) -> None:
    t0, t1 = time_ms(unfused, repeats=40), time_ms(fused, repeats=40)
    gbs = passes * nbytes / (t1 * 1e-3) / 1e9
    print(
        f"{name:<22} {t0 * 1e3:9.1f} {t1 * 1e3:9.1f} {t0 / t1:7.2f}x {(t0 - t1) * 1e3:8.1f}"
        f" {gbs:8.0f}  {'yes' if equal else 'NO'}"
    )


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--multiplier", type=float, default=None, help="Granite's multiplier")
    a = parser.parse_args()
    m, eps = a.multiplier, 1e-5
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.tokens, a.hidden)
    r, h, ds, dy = (torch.randn(shape, device="cuda", generator=gen).bfloat16() for _ in range(4))
    w = (1 + 0.1 * torch.randn(a.hidden, device="cuda", generator=gen)).bfloat16()
    nbytes = r.numel() * r.element_size()

    def fwd_unfused():
        s = r + (h if m is None else h * m)
        return (s, *rms_norm_forward(s, w, eps, 0.0, "llama"))

    def fwd_fused():
        return add_rms_norm_forward(r, h, w, eps, 0.0, "llama", m)

    s, _, rstd = fwd_fused()

    def bwd_unfused(dw: bool = False):
        dx, dwt = rms_norm_backward(dy, s, w, rstd, 0.0, "llama", dw)
        d = ds + dx
        return d, (None if m is None else d * m), dwt

    def bwd_fused(dw: bool = False):
        return add_norm_backward(ds, dy, s, w, rstd, 0.0, "llama", dw, m)

    def autograd_run(fused: bool):
        rr, hh = r.detach().requires_grad_(), h.detach().requires_grad_()
        if fused:
            out = add_rms_norm(rr, hh, w, eps, multiplier=m)
        else:
            sum_ = rr + (hh if m is None else hh * m)
            out = (sum_, rms_norm(sum_, w, eps))
        torch.autograd.backward(out, (ds, dy))
        return rr.grad, hh.grad

    print(f"[{a.tokens}, {a.hidden}] bf16, multiplier {m}, {torch.cuda.get_device_name()}")
    print(f"{'':<22} {'unfused':>9} {'fused':>9} {'ratio':>8} {'saved':>8} {'GB/s':>8}  bit-equal")
    print(f"{'(us)':<22}")
    _row("forward", fwd_unfused, fwd_fused, 4, nbytes, _same(fwd_unfused(), fwd_fused()))
    _row("backward", bwd_unfused, bwd_fused, 4 + (m is not None), nbytes,
         _same(bwd_unfused(), bwd_fused()))  # fmt: skip
    _row("backward +dw", lambda: bwd_unfused(True), lambda: bwd_fused(True), 4 + (m is not None),
         nbytes, _same(bwd_unfused(True), bwd_fused(True)))  # fmt: skip
    _row("fwd+bwd autograd", lambda: autograd_run(False), lambda: autograd_run(True), 8, nbytes,
         _same(autograd_run(False), autograd_run(True)))  # fmt: skip
    print("per decoder layer and step: forward + 2 x backward (x 32 layers for Llama-8B)")


if __name__ == "__main__":
    main()
