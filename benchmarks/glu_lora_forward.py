"""The LoRA MLP's forward tail: h written with T = h A^T behind it, then one folded down GEMM.

    python benchmarks/glu_lora_forward.py [--tokens 4096] [--hidden 4096] [--inter 14336]
                                          [--only pair,mlp]

* ``pair``: at ``[tokens, inter]`` bf16, r 16, silu: the activation alone (the bandwidth floor:
  2 reads + 1 write of ``[tokens, inter]``), the old pair (``swiglu_forward`` then
  ``T = h A^T`` by ``torch.mm``) and ``glu_lora_forward.glu_lora`` (the activation kernel
  writing into the rows of ``[h | room]``, then the ``mm`` and ``[T | 0]`` in the room); time
  and achieved bandwidth, L2 evicted before each repeat.
* ``mlp``: one Llama-3.1-8B LoRA MLP (r 16 on gate, up, down) through ``lora_mlp`` with NF4 and
  with bf16 bases, ``glu_lora_forward.ENABLED`` off (old) vs on (new): forward alone, and
  forward + backward. The difference is the saving per layer and step (x 32 layers).

Times are CUDA-event medians; under a minute on an H100. Nothing here is a unit test.
"""

from __future__ import annotations

import torch
from mlp_case import llama_mlp, run_sections  # this folder (scripts run from here)
from timing import time_ms

from turbotune.ops import glu_lora_forward as glf
from turbotune.ops.lora import lora_mlp
from turbotune.ops.swiglu import swiglu_forward


def pair(tokens: int, inter: int, r: int = 16) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    eu = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
    a = torch.randn(r, inter, device="cuda", dtype=torch.bfloat16, generator=gen) / inter**0.5
    traffic = 3 * tokens * inter * 2  # bytes: e, u read, h written
    print(f"== h = silu(e) * u and T = h A^T, [{tokens}, {inter}] bf16, r {r} (L2 evicted)")
    print(f"  {'variant':42s} {'ms':>8s} {'GB/s':>8s}")

    def row(name: str, fn) -> None:
        ms = time_ms(fn)
        print(f"  {name:42s} {ms:8.3f} {traffic / ms / 1e6:8.0f}", flush=True)

    row("activation alone (floor)", lambda: swiglu_forward(e, u))
    row("old: activation + mm", lambda: torch.mm(swiglu_forward(e, u), a.t()))
    row("glu_lora: activation into [h | room] + mm", lambda: glf.glu_lora(e, u, a, "silu", room=r))


def mlp(tokens: int, hidden: int, inter: int, r: int = 16) -> None:
    dense, nf4, adapters, x, dy = llama_mlp(tokens, hidden, inter, r)
    print(f"== LoRA MLP, {tokens} tokens, {hidden} -> {inter}, r {r}, bf16 compute")
    print(f"  {'bases':6s} {'pass':8s} {'old ms':>8s} {'new ms':>8s} {'saved us':>9s}")
    for name, bases in (("nf4", nf4), ("bf16", dense)):
        projs = [(w, ad) for w, ad in zip(bases, adapters)]
        passes = {
            "fwd": lambda projs=projs: lora_mlp(x, *projs),
            "fwd+bwd": lambda projs=projs: lora_mlp(x, *projs).backward(dy),
        }
        for label, fn in passes.items():
            times = {}
            for enabled in (False, True):
                glf.ENABLED = enabled
                try:
                    times[enabled] = time_ms(fn, repeats=20, cold=False)
                finally:
                    glf.ENABLED = True
            saved_us = 1000 * (times[False] - times[True])
            print(f"  {name:6s} {label:8s} {times[False]:8.3f} {times[True]:8.3f} {saved_us:9.1f}")


def main() -> None:
    sections = {
        "pair": lambda args: pair(args.tokens, args.inter),
        "mlp": lambda args: mlp(args.tokens, args.hidden, args.inter),
    }
    run_sections(__doc__, sections)


if __name__ == "__main__":
    main()
