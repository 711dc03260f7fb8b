"""The LoRA MLP's forward tail: h and T = h A^T in one kernel, then one folded down GEMM.

    python benchmarks/glu_lora_forward.py [--tokens 4096] [--hidden 4096] [--inter 14336]
                                          [--only kernels,mlp]

* ``kernels``: at ``[tokens, inter]`` bf16, r 16, silu: the old pair (``swiglu_forward`` then
  ``T = h A^T`` by ``torch.mm``; the activation alone is the bandwidth floor: same traffic as
  the new kernel) vs ``glu_lora_forward.glu_lora`` for a sweep of BLOCK_M / BLOCK_I /
  num_warps / num_stages / SPLIT (programs per row block along I, fp32 partials of T summed
  by torch; the module's defaults are marked ``*``); time and achieved
  bandwidth (2 reads + 1 write of ``[tokens, inter]``), L2 evicted before each repeat.
* ``mlp``: one Llama-3.1-8B LoRA MLP (r 16 on gate, up, down) through ``lora_mlp`` with NF4 and
  with bf16 bases, ``glu_lora_forward.ENABLED`` off (old) vs on (new): forward alone, and
  forward + backward. The difference is the saving per layer and step (x 32 layers).

To adopt a kernel config, set ``BLOCK_M``, ``BLOCK_I``, ``NUM_WARPS``, ``NUM_STAGES``, ``SPLIT`` in
``src/turbotune/ops/glu_lora_forward.py``. Times are CUDA-event medians; under a minute on an
H100. Nothing here is a unit test.
"""

from __future__ import annotations

import torch
from mlp_case import llama_mlp, run_sections  # this folder (scripts run from here)
from timing import time_ms

from turbotune.ops import glu_lora_forward as glf
from turbotune.ops.lora import lora_mlp
from turbotune.ops.swiglu import swiglu_forward

# (BLOCK_M, BLOCK_I, num_warps, num_stages, SPLIT)
SWEEP = [  # session 5's first H100 sweep: splits won (64/128/4/3 split 4: 0.208 ms); around it
    (32, 128, 4, 3, 4),
    (64, 128, 4, 3, 4),
    (64, 128, 4, 2, 4),
    (64, 128, 4, 4, 4),
    (64, 64, 4, 3, 4),
    (128, 128, 8, 3, 4),
    (16, 128, 4, 3, 8),
    (32, 128, 4, 3, 8),
    (32, 64, 4, 3, 8),
    (64, 128, 4, 3, 8),
    (64, 64, 4, 3, 8),
    (16, 64, 4, 3, 16),
    (32, 64, 4, 3, 16),
]


def kernels(tokens: int, inter: int, r: int = 16) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    eu = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
    a = torch.randn(r, inter, device="cuda", dtype=torch.bfloat16, generator=gen) / inter**0.5
    traffic = 3 * tokens * inter * 2  # bytes: e, u read, h written
    default = (glf.BLOCK_M, glf.BLOCK_I, glf.NUM_WARPS, glf.NUM_STAGES, glf.SPLIT)
    print(f"== h = silu(e) * u and T = h A^T, [{tokens}, {inter}] bf16, r {r} (L2 evicted)")
    print(f"  {'variant':36s} {'ms':>8s} {'GB/s':>8s}")

    def row(name: str, fn) -> None:
        ms = time_ms(fn)
        print(f"  {name:36s} {ms:8.3f} {traffic / ms / 1e6:8.0f}", flush=True)

    row("activation alone (floor)", lambda: swiglu_forward(e, u))
    row("old: activation + mm", lambda: torch.mm(swiglu_forward(e, u), a.t()))
    for bm, bi, warps, stages, split in SWEEP:
        mark = "*" if (bm, bi, warps, stages, split) == default else " "
        name = f"{mark}new: M{bm} I{bi} w{warps} s{stages} split{split}"
        row(name, lambda bm=bm, bi=bi, w=warps, s=stages, sp=split: glf.glu_lora(
            e, u, a, "silu", room=r, block_m=bm, block_i=bi, num_warps=w, num_stages=s,
            split=sp, fused=True))  # fmt: skip
    row(
        "pair: activation into [h | room] + mm",
        lambda: glf.glu_lora(e, u, a, "silu", room=r, fused=False),
    )


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
        "kernels": lambda args: kernels(args.tokens, args.inter),
        "mlp": lambda args: mlp(args.tokens, args.hidden, args.inter),
    }
    run_sections(__doc__, sections)


if __name__ == "__main__":
    main()
