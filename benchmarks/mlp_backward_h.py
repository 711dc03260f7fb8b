"""The LoRA MLP's backward with ``h`` written by the activation's backward kernel, vs recomputed.

    python benchmarks/mlp_backward_h.py [--tokens 4096] [--hidden 4096] [--inter 14336]

* ``kernels``: at ``[tokens, inter]`` bf16, the old pair (``swiglu_forward`` recomputing ``h``:
  2 reads + 1 write; then ``swiglu_backward`` in place: 3 reads + 2 writes) vs
  ``swiglu_backward_with_h`` (3 reads + 3 writes, ``h`` over ``dh``), without and with a
  dropout mask; time and achieved bandwidth, L2 evicted before each repeat.
* ``mlp``: one Llama-3.1-8B LoRA MLP (r 16 on gate, up, down) forward + backward through
  ``lora_mlp`` with NF4 and with bf16 bases, new backward vs the old order (``h`` recomputed by
  its own kernel before the down projection's backward, rebuilt here from the same pieces).
  The difference is the saving per layer and step (x 32 layers for Llama-8B).

Times are CUDA-event medians. Nothing here is a unit test. About 30 s on an H100.
"""

from __future__ import annotations

import torch
from mlp_case import llama_mlp, run_sections  # this folder (scripts run from here)
from timing import time_ms

from turbotune.ops import lora as lora_ops
from turbotune.ops.lora import lora_mlp
from turbotune.ops.lora_mlp_backward import _glu_backward_inplace, glu_forward
from turbotune.ops.swiglu import swiglu_backward, swiglu_backward_with_h, swiglu_forward


def kernels(tokens: int, inter: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    eu = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    dh = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
    keep = torch.rand(tokens, inter, device="cuda", generator=gen) >= 0.1
    elem = tokens * inter * 2  # bytes of one [tokens, inter] bf16 tensor
    # In place over e, u, dh: values drift between repeats, the memory traffic does not.
    runs = {
        "old: forward(h) + backward": (lambda: (swiglu_forward(e, u),
                                               swiglu_backward(dh, e, u, inplace=True)), 8),
        "new: backward_with_h": (lambda: swiglu_backward_with_h(dh, e, u, inplace=True,
                                                               out_h=dh), 6),
        "new: backward_with_h + mask": (lambda: swiglu_backward_with_h(
            dh, e, u, inplace=True, out_h=dh, keep=keep, dropout=0.1), 6.5),
    }  # fmt: skip
    print(f"== gated activation backward, [{tokens}, {inter}] bf16 (L2 evicted)")
    print(f"  {'variant':32s} {'ms':>8s} {'GB/s':>8s}")
    for name, (fn, passes) in runs.items():
        ms = time_ms(fn)
        print(f"  {name:32s} {ms:8.3f} {passes * elem / ms / 1e6:8.0f}")


def _old_down_and_glu_backward(dy, e, u, down, layout, saved, needs, activation, gate_up=None):
    """The order before: recompute h, down projection's backward with it, then the in-place
    activation backward (``ops/lora.py`` up to commit 21cafdf)."""
    h = glu_forward(e, u, activation)
    dh, grads = lora_ops._projections_backward(
        dy, [dy], h, [down], layout, saved, [needs._replace(x=True)]
    )
    del h
    _glu_backward_inplace(dh, e, u, activation)
    return grads, None  # the gate/up group computes its dB


def mlp(tokens: int, hidden: int, inter: int, r: int = 16) -> None:
    dense, nf4, adapters, x, dy = llama_mlp(tokens, hidden, inter, r)
    new = lora_ops.down_and_glu_backward
    print(f"== LoRA MLP fwd+bwd, {tokens} tokens, {hidden} -> {inter}, r {r}, bf16 compute")
    print(f"  {'bases':6s} {'old ms':>8s} {'new ms':>8s} {'saved us':>9s}")
    for name, bases in (("nf4", nf4), ("bf16", dense)):
        projs = [(w, ad) for w, ad in zip(bases, adapters)]

        def step(projs=projs):
            lora_mlp(x, *projs).backward(dy)

        times = {}
        for label, fn in (("old", _old_down_and_glu_backward), ("new", new)):
            lora_ops.down_and_glu_backward = fn
            try:
                times[label] = time_ms(step, repeats=20, cold=False)
            finally:
                lora_ops.down_and_glu_backward = new
        saved_us = 1000 * (times["old"] - times["new"])
        print(f"  {name:6s} {times['old']:8.3f} {times['new']:8.3f} {saved_us:9.1f}")


def main() -> None:
    sections = {
        "kernels": lambda args: kernels(args.tokens, args.inter),
        "mlp": lambda args: mlp(args.tokens, args.hidden, args.inter),
    }
    run_sections(__doc__, sections)


if __name__ == "__main__":
    main()
