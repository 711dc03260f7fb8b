"""The LoRA MLP's gated-activation backward with the down adapter's ``dA``: old pair vs fused.

    python benchmarks/glu_lora_backward.py [--tokens 4096] [--inter 14336] [--rank 16]

* ``kernels``: at ``[tokens, inter]`` bf16 (``e``, ``u`` column views of ``[e | u]``, as the MLP
  saves them), the old pair (``swiglu_backward_with_h``: 3 reads + 3 writes, ``h`` over ``dh``;
  then ``dA = g^T h`` by cuBLAS: 1 read) vs ``glu_lora_backward.glu_backward_lora_da`` (3 reads
  + 2 writes, ``dA`` summed in-kernel) for a sweep of launch settings (``block_i``,
  ``block_m``, ``num_warps``, ``num_stages``, ``split_m``; ``split_m`` 0 = the automatic
  choice, shown resolved). Time, achieved bandwidth, L2 evicted before each repeat. The best
  row is the config to put in ``glu_lora_backward.CONFIG``.
* ``db``: the same kernel also summing the gate/up adapters' ``dB = s de^T t`` (``t`` column
  views of a ``[tokens, hidden + 2 r]`` ``[x | T]``, as the folded layout saves them) vs the
  kernel without them + the two cuBLAS products the group's backward ran before
  (``glu_lora_backward.FUSED_DB``), for the same sweep of launch settings.
* ``mlp``: one Llama-3.1-8B LoRA MLP (NF4 bases, r on gate, up, down) forward + backward through
  ``lora_mlp`` with ``glu_lora_backward.ENABLED`` False, ENABLED with ``FUSED_DB`` False, and
  both True: the saving per layer and step.

Times are CUDA-event medians. Nothing here is a unit test. Under a minute on an H100.
"""

from __future__ import annotations

import torch
from mlp_case import llama_mlp, run_sections  # this folder (scripts run from here)
from timing import time_ms

from turbotune.ops import glu_lora_backward as fused
from turbotune.ops.swiglu import swiglu_backward_with_h

# (block_i, block_m, num_warps, num_stages, split_m)
SWEEP = [  # around the session-5 winners (64/32/4/3 auto without dB, 64/32/4/2 split 8 with)
    (64, 32, 4, 2, 0),
    (64, 32, 4, 3, 0),
    (64, 32, 4, 2, 8),
    (64, 32, 4, 3, 8),
    (64, 32, 4, 2, 12),
    (64, 32, 4, 3, 12),
    (64, 32, 4, 2, 16),
    (64, 16, 4, 2, 8),
    (64, 16, 4, 3, 8),
    (32, 32, 4, 2, 8),
    (32, 32, 4, 3, 4),
    (128, 64, 8, 2, 4),
    (128, 64, 8, 3, 8),
]


def kernels(tokens: int, inter: int, rank: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    eu = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    dh = torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16, generator=gen)
    e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
    # Same answer first (fresh copies: both paths overwrite their inputs).
    e1, u1, dh1 = e.clone(), u.clone(), dh.clone()
    _, _, h = swiglu_backward_with_h(dh1, e1, u1, inplace=True, out_h=dh1)
    want = torch.mm(g.t(), h).float()
    e2, u2 = e.clone(), u.clone()
    got = fused.glu_backward_lora_da(dh, e2, u2, g, "silu", torch.float32).d_a
    print(f"dA max |new - old| {(got - want).abs().max().item():.3e} (max |dA| "
          f"{want.abs().max().item():.3e}); de, du equal: {torch.equal(e1, e2)}, "
          f"{torch.equal(u1, u2)}")  # fmt: skip
    del e1, u1, dh1, h, e2, u2

    elem = tokens * inter * 2  # bytes of one [tokens, inter] bf16 tensor
    old_kernel = lambda: swiglu_backward_with_h(dh, e, u, inplace=True, out_h=dh)  # noqa: E731
    old_mm = lambda: torch.mm(g.t(), dh)  # noqa: E731
    print(f"== [{tokens}, {inter}] bf16, r {rank}: old (kernel + mm) vs fused (L2 evicted)")
    print(f"  {'variant':44s} {'us':>8s} {'GB/s':>7s} {'vs old':>7s}")
    t_kernel, t_mm = time_ms(old_kernel), time_ms(old_mm)
    t_old = time_ms(lambda: (old_kernel(), old_mm()))
    for name, ms, passes in (("old: backward_with_h", t_kernel, 6), ("old: mm g^T h", t_mm, 1),
                             ("old: both", t_old, 7)):  # fmt: skip
        print(f"  {name:44s} {1000 * ms:8.1f} {passes * elem / ms / 1e6:7.0f} {'':>7s}")
    best = None
    for block_i, block_m, warps, stages, split in SWEEP:
        config = fused.LaunchConfig(block_i, block_m, warps, stages, split)
        ms = time_ms(lambda c=config: fused.glu_backward_lora_da(dh, e, u, g, "silu",
                                                                 torch.float32, c))  # fmt: skip
        resolved = fused.row_ranges(tokens, inter, config, dh.device)[0]
        name = (f"new: bi {block_i} bm {block_m} w {warps} st {stages} split "
                f"{split or 'auto'}={resolved}")  # fmt: skip
        print(f"  {name:44s} {1000 * ms:8.1f} {5 * elem / ms / 1e6:7.0f} {t_old / ms:6.2f}x")
        if best is None or ms < best[0]:
            best = (ms, config)
    print(f"  best: {best[1]} {1000 * best[0]:.1f} us, saves {1000 * (t_old - best[0]):.1f} us "
          f"per layer vs old; CONFIG now: {fused.CONFIG}")  # fmt: skip


def db(tokens: int, hidden: int, inter: int, rank: int) -> None:
    from turbotune.ops.lora_group import placeholder

    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    eu = torch.randn(tokens, 2 * inter, generator=gen, **bf16)
    dh = torch.randn(tokens, inter, generator=gen, **bf16)
    g = torch.randn(tokens, rank, generator=gen, **bf16)
    x_aug = torch.randn(tokens, hidden + 2 * rank, generator=gen, **bf16)  # [x | t_g | t_u]
    t_g, t_u = x_aug.narrow(1, hidden, rank), x_aug.narrow(1, hidden + rank, rank)
    gate_up = fused.GateUpT(t_g, t_u, (2.0, 2.0), (torch.float32, torch.float32))
    e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
    nothing = placeholder(torch.bfloat16, e.device)

    def products():  # lora_fold.fold_backward's dB of gate and up (then the cast to fp32)
        for d, t in ((e, t_g), (u, t_u)):
            torch.addmm(nothing, d.t(), t, beta=0, alpha=2.0).float()

    # Same answer first (fresh copies: the kernel overwrites e, u).
    e1, u1 = e.clone(), u.clone()
    out = fused.glu_backward_lora_da(dh, e1, u1, g, "silu", torch.float32, gate_up=gate_up)
    for name, d, t, got in (("gate", e1, t_g, out.d_b_gate), ("up", u1, t_u, out.d_b_up)):
        want = 2.0 * torch.mm(d.t(), t).float()
        print(f"dB {name}: max |kernel - mm| {(got - want).abs().max().item():.3e} (max |dB| "
              f"{want.abs().max().item():.3e})")  # fmt: skip
    del e1, u1, out

    print(f"== [{tokens}, {inter}] bf16, r {rank} (down, gate, up): kernel + 2 dB products vs "
          f"kernel with dB (L2 evicted)")  # fmt: skip
    print(f"  {'variant':44s} {'us':>8s} {'old us':>8s} {'saved':>7s}")
    t_products = time_ms(products)
    print(f"  {'old: 2 dB products alone':44s} {1000 * t_products:8.1f}")
    best = None
    for block_i, block_m, warps, stages, split in SWEEP:
        config = fused.LaunchConfig(block_i, block_m, warps, stages, split)

        def old(c=config):
            fused.glu_backward_lora_da(dh, e, u, g, "silu", torch.float32, c)
            products()

        def new(c=config):
            fused.glu_backward_lora_da(dh, e, u, g, "silu", torch.float32, c, gate_up)

        t_old, t_new = time_ms(old), time_ms(new)
        name = f"bi {block_i} bm {block_m} w {warps} st {stages} split {split or 'auto'}"
        print(f"  {name:44s} {1000 * t_new:8.1f} {1000 * t_old:8.1f} "
              f"{1000 * (t_old - t_new):6.1f}")  # fmt: skip
        if best is None or t_new < best[0]:
            best = (t_new, config, t_old)
    print(f"  best with dB: {best[1]} {1000 * best[0]:.1f} us (old at it {1000 * best[2]:.1f} us)"
          f"; CONFIG now: {fused.CONFIG}")  # fmt: skip


def mlp(tokens: int, hidden: int, inter: int, rank: int) -> None:
    from turbotune.ops.lora import lora_mlp

    _, nf4, adapters, x, dy = llama_mlp(tokens, hidden, inter, rank)
    projs = list(zip(nf4, adapters, strict=True))
    times = {}
    for enabled, fused_db in ((False, False), (True, False), (True, True)):
        fused.ENABLED, fused.FUSED_DB = enabled, fused_db
        try:
            times[enabled, fused_db] = time_ms(
                lambda: lora_mlp(x, *projs).backward(dy), 20, cold=False
            )
        finally:
            fused.ENABLED, fused.FUSED_DB = True, True
    print(f"== LoRA MLP fwd+bwd (NF4), {tokens} tokens, {hidden} -> {inter}, r {rank}")
    old, da, both = times[False, False], times[True, False], times[True, True]
    print(f"  ENABLED False {old:.3f} ms; ENABLED, FUSED_DB False {da:.3f} ms; both True "
          f"{both:.3f} ms: FUSED_DB saves {1000 * (da - both):.1f} us per layer, both "
          f"{1000 * (old - both):.1f} us")  # fmt: skip


def main() -> None:
    sections = {
        "kernels": lambda args: kernels(args.tokens, args.inter, args.rank),
        "db": lambda args: db(args.tokens, args.hidden, args.inter, args.rank),
        "mlp": lambda args: mlp(args.tokens, args.hidden, args.inter, args.rank),
    }
    run_sections(__doc__, sections, rank=True)


if __name__ == "__main__":
    main()
