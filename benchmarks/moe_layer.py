"""MoE layer forward+backward at the Mixtral-8x7B and Qwen3-30B-A3B shapes, one table.

Each point is transformers' own sparse MoE block (router + experts, bf16, every parameter
trainable, 8192 tokens) with its experts computed by:

- ``hf-grouped_mm`` / ``hf-eager``: transformers' ``config._experts_implementation``;
- ``loop``: a plain per-expert loop (``turbotune.moe.reference``);
- ``tt-grouped_mm`` / ``tt-mm_loop`` / ``tt-triton`` / ``tt-auto``: turbotune's experts patch
  with that backend; suffixes switch one thing off (:func:`variant`): ``tt-mm_loop:sync`` reads
  the row counts with a blocking ``tolist()``, ``tt-mm_loop:eager-plan`` sorts with
  ``torch.sort`` (``turbotune.moe.plan.ASYNC_COUNTS``, ``turbotune.moe.plan_kernel.ENABLED``).

Timing: CUDA events around forward+backward, median of ``--iters`` after ``--warmup`` (the
Triton autotuner runs during warmup). Each run starts on an idle GPU, so the host time of the
layer's first launches (router, sort) is in it; ``--head-start MS`` queues MS of GPU work before
each run (outside the events), as inside a model, where they queue behind the previous layer.
With ``--rounds N`` every implementation's block is built
once and the implementations take turns N times (a GPU that heats up or a host that slows down
then weighs on all of them alike); each cell is the median of the rounds' medians, and the
ratios of each round are printed. ``--frozen`` times the QLoRA/LoRA case (expert stacks
frozen: no weight-gradient products). The FLOP floor is ``6 * T * k * 3 * H * I`` (forward 2 FLOP
per multiply-add for 3 projections, backward twice that) at ``--peak`` TFLOP/s.

Budget at the Mixtral shape (8192 tokens, 16384 sorted rows): the six expert products are
17.3 TFLOP (21.9 ms at 790 TFLOP/s; the four of frozen stacks 14.6 ms); everything else moves
about 5 GB (SwiGLU forward 1.4 GB and backward 2.35 GB, gather, combine and its backward, the
input gradient's k-row sum, router: ~1.7 ms at 3 TB/s) plus ~0.2 ms of small kernels and the
host read of the row counts. 1.5x transformers' grouped_mm (~37.5 / 28.4 ms on an H100) thus
needs the products at ~750 TFLOP/s trainable, ~670 frozen.

``--gemms`` adds a table of the six expert products of one layer (gate/up and down: forward,
input gradient, weight gradient) at the block's own routing: the per-expert ``mm`` loop against
``torch._grouped_mm`` and against one dense ``mm`` of the same FLOPs (what cuBLAS reaches on
that shape without experts). ``--profile`` prints the top GPU kernels of one forward+backward
of each implementation; ``--gaps`` the GPU's idle gaps in it and the Python lines that launched
the kernel after each of the largest (``profile_point.gap_report``).

    python benchmarks/moe_layer.py                      # both shapes, all implementations
    python benchmarks/moe_layer.py --shapes qwen3 --impls hf-grouped_mm,tt-triton --iters 50
    python benchmarks/moe_layer.py --shapes mixtral --impls hf-grouped_mm,tt-mm_loop --gemms
    python benchmarks/moe_layer.py --shapes mixtral --frozen --rounds 3 \
        --impls hf-grouped_mm,tt-mm_loop,tt-mm_loop:sync --gaps
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import types

import torch

SHAPES = {  # name: (config class, block class, hidden, intermediate, experts, top-k)
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock", 4096, 14336, 8, 2),
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", 2048, 768, 128, 8),
}
IMPLS = [
    "hf-grouped_mm", "hf-eager", "loop", "tt-grouped_mm", "tt-mm_loop", "tt-triton", "tt-auto",
]  # fmt: skip


def build_block(shape: str, impl: str, frozen: bool, device: str, shrink: int = 1):
    """transformers' sparse block of ``shape`` (dimensions divided by ``shrink`` for smoke runs)."""
    import transformers

    config_cls, block_cls, hidden, inter, experts, k = SHAPES[shape]
    hidden, inter = hidden // shrink, inter // shrink
    kwargs = {"hidden_size": hidden, "num_experts_per_tok": k}
    if shape == "mixtral":
        kwargs.update(intermediate_size=inter, num_local_experts=experts)
    else:
        kwargs.update(moe_intermediate_size=inter, num_experts=experts, norm_topk_prob=True)
    config = getattr(transformers, config_cls)(**kwargs)
    config._experts_implementation = impl[3:] if impl.startswith("hf-") else "eager"
    assert impl.split(":")[0] in IMPLS, f"unknown implementation {impl!r}: one of {IMPLS}"
    module = importlib_module(shape)
    torch.manual_seed(0)
    with torch.device(device):
        block = getattr(module, block_cls)(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    if frozen:
        block.experts.requires_grad_(False)
    _set_experts(block.experts, impl)
    return block


def importlib_module(shape: str):
    import importlib

    name = "mixtral" if shape == "mixtral" else "qwen3_moe"
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


@contextlib.contextmanager
def variant(impl: str):
    """Within: the module switches named by ``impl``'s suffixes (``tt-mm_loop:sync:eager-plan``):
    ``sync`` reads the row counts with a blocking ``tolist()``, ``eager-plan`` sorts the slots
    with ``torch.sort`` instead of the one-launch counting sort."""
    from turbotune.moe import plan, plan_kernel

    flags = set(impl.split(":")[1:])
    unknown = flags - {"sync", "eager-plan"}
    assert not unknown, f"unknown variant {unknown} of {impl}"
    saved = plan.ASYNC_COUNTS, plan_kernel.ENABLED
    plan.ASYNC_COUNTS, plan_kernel.ENABLED = "sync" not in flags, "eager-plan" not in flags
    try:
        yield
    finally:
        plan.ASYNC_COUNTS, plan_kernel.ENABLED = saved


def _set_experts(experts: torch.nn.Module, impl: str) -> None:
    impl = impl.split(":")[0]
    if impl.startswith("tt-"):
        from turbotune.moe.patch import experts_forward
        from turbotune.patches.engine import PatchSet

        PatchSet("bench").bind(experts, "moe", experts_forward(impl[3:]))
    elif impl == "loop":
        from turbotune.moe.reference import moe_experts_reference

        def loop(self, hidden, index, weights):
            return moe_experts_reference(hidden, index, weights, self.gate_up_proj, self.down_proj)

        experts.forward = types.MethodType(loop, experts)


def profile_block(block: torch.nn.Module, tokens: int, rows: int = 12, gaps: bool = False) -> None:
    """Print the top GPU kernels of one forward+backward (after the timed runs: warm), and with
    ``gaps`` the GPU's idle gaps and who launched the kernel after each."""
    from torch.profiler import ProfilerActivity, profile

    param = next(block.parameters())
    x = torch.randn(1, tokens, block.experts.hidden_dim, device=param.device, dtype=param.dtype)
    x.requires_grad_()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if gaps else [])
    with profile(activities=activities, with_stack=gaps) as prof:
        block(x).backward(torch.randn_like(x))
        torch.cuda.synchronize()
    block.zero_grad(set_to_none=True)
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows))
    if gaps:
        from profile_point import gap_report  # benchmarks/ is this script's directory

        trace = "/tmp/moe-layer-trace.json"
        prof.export_chrome_trace(trace)
        gap_report(trace, top=8)


def _median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_table(block: torch.nn.Module, tokens: int, peak: float) -> None:
    """The six expert products of one layer at the block's routing: per-expert ``mm`` loop,
    ``torch._grouped_mm`` and one dense ``mm`` of the same shape totals (ms and TFLOP/s)."""
    from turbotune.moe.expert_loop import mm_rows, mm_wgrad
    from turbotune.moe.plan import plan_experts

    experts = block.experts
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    num_experts, hidden, inter = dn.shape
    x = torch.randn(tokens, hidden, device=gu.device, dtype=gu.dtype)
    with torch.no_grad():
        index = (getattr(block, "gate", None) or block.router)(x)[-1]  # (logits, w, index)
    plan = plan_experts(index, num_experts).on_host()
    slots = plan.num_slots
    rows = x.index_select(0, plan.order // plan.top_k)
    h, dgu = torch.randn(slots, inter, **_like(gu)), torch.randn(slots, 2 * inter, **_like(gu))
    dy = torch.randn(slots, hidden, **_like(gu))
    products = [  # name, rows A, stack as [E, K, N] (or None: weight gradient of G^T A), G
        ("gate_up fwd", rows, gu.transpose(1, 2), None),
        ("down fwd", h, dn.transpose(1, 2), None),
        ("down dgrad", dy, dn, None),
        ("down wgrad", h, None, dy),
        ("gate_up dgrad", dgu, gu, None),
        ("gate_up wgrad", rows, None, dgu),
    ]
    sizes = plan.sizes if num_experts <= 16 else f"{min(plan.sizes)}..{max(plan.sizes)} each"
    print(f"## expert products, {slots} rows over {num_experts} experts: {sizes}")
    print("| ms (TFLOP/s): product | M x N x K | mm loop | grouped_mm | one dense mm |")
    print("|---|---|---:|---:|---:|")
    totals = [0.0] * 3
    for name, a, w_t, g in products:
        if g is None:
            m, k, n = a.shape[0], w_t.shape[1], w_t.shape[2]
            dense_b = torch.randn(k, n, **_like(gu))
            fns = [
                lambda a=a, w_t=w_t: mm_rows(a, w_t, plan),
                lambda a=a, w_t=w_t: torch._grouped_mm(a, w_t, offs=plan.ends),
                lambda a=a, b=dense_b: torch.mm(a, b),
            ]
        else:  # dW [E, N, K] = G^T A, reduced over each expert's rows
            m, n, k = a.shape[0], g.shape[1], a.shape[1]
            fns = [
                lambda a=a, g=g: mm_wgrad(g, a, plan),
                lambda a=a, g=g: torch._grouped_mm(g.t(), a, offs=plan.ends),
                lambda a=a, g=g: torch.mm(g.t(), a),  # one [N, K] over all rows: same FLOPs
            ]
        times = [_median_ms(fn) for fn in fns]
        flops = 2 * m * n * k
        cells = " | ".join(f"{t:.3f} ({flops / t / 1e9:.0f})" for t in times)
        print(f"| {name} | {m}x{n}x{k} | {cells} |")
        totals = [a + b for a, b in zip(totals, times)]
    floor = 6 * slots * 3 * hidden * inter / (peak * 1e12) * 1e3
    print(f"| all six | floor {floor:.2f} | " + " | ".join(f"{t:.2f}" for t in totals) + " |")


def _like(t: torch.Tensor) -> dict:
    return {"device": t.device, "dtype": t.dtype}


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # wake the clocks
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def time_block(block: torch.nn.Module, tokens: int, warmup: int, iters: int, head_start: int = 0):
    """Median milliseconds of forward+backward and the peak memory (GiB) over the timed runs.

    ``head_start``: GPU cycles of a spin kernel queued before each timed run (outside the
    events), so that the host has launched the layer's first kernels by the time the GPU gets to
    them, as inside a model where they queue behind the previous layer's work; 0: every run
    starts on an idle GPU, its first launches exposed."""
    param = next(block.parameters())
    x = torch.randn(1, tokens, block.experts.hidden_dim, device=param.device, dtype=param.dtype)
    x.requires_grad_()
    grad = torch.randn_like(x)
    cuda = x.is_cuda
    times = []
    for i in range(warmup + iters):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        t0 = time.perf_counter()
        if cuda and head_start:
            torch.cuda._sleep(head_start)
        if cuda:
            start.record()
        block(x).backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t0))
        x.grad = None
        block.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral,qwen3")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="implementations take turns")
    parser.add_argument("--peak", type=float, default=790.0, help="dense bf16 TFLOP/s (measured)")
    parser.add_argument("--frozen", action="store_true", help="expert stacks frozen (LoRA/QLoRA)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (use --shrink)")
    parser.add_argument("--shrink", type=int, default=1, help="divide hidden/intermediate by this")
    parser.add_argument("--gemms", action="store_true", help="time the six expert products")
    parser.add_argument("--profile", action="store_true", help="top GPU kernels per impl")
    parser.add_argument("--gaps", action="store_true", help="GPU idle gaps per impl (a trace)")
    parser.add_argument(
        "--head-start", type=float, default=0.0, help="ms of GPU work queued before each run"
    )
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# {gpu} torch {torch.__version__} tokens {args.tokens} bf16 fwd+bwd"
          f"{' frozen experts' if args.frozen else ''}, {args.rounds} round(s), head start "
          f"{args.head_start} ms")  # fmt: skip
    for shape in args.shapes.split(","):
        run_shape(shape, args)


def run_shape(shape: str, args: argparse.Namespace) -> None:
    """Time every implementation at ``shape`` (taking turns over ``args.rounds``) and print the
    table, then the per-round ratios and the optional diagnostics."""
    _, _, hidden, inter, _, k = SHAPES[shape]
    hidden, inter = hidden // args.shrink, inter // args.shrink
    multiplier = 4 if args.frozen else 6  # no weight-gradient products when frozen
    floor_ms = multiplier * args.tokens * k * 3 * hidden * inter / (args.peak * 1e12) * 1e3
    impls = args.impls.split(",")
    cuda = args.device == "cuda"
    head_start = int(args.head_start * sleep_cycles_per_ms()) if cuda and args.head_start else 0
    blocks = {
        impl: build_block(shape, impl, args.frozen, args.device, args.shrink) for impl in impls
    }
    rounds: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            try:
                with variant(impl):
                    rounds[impl].append(
                        time_block(blocks[impl], args.tokens, args.warmup, args.iters, head_start)
                    )
            except torch.OutOfMemoryError:
                rounds[impl].append((float("nan"), float("nan")))
            except Exception as error:  # one broken impl must not lose the others' numbers
                print(f"## {shape} {impl} failed: {error!r}")
                rounds[impl].append((float("nan"), float("nan")))
    results = {
        impl: (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
        for impl, runs in rounds.items()
    }
    print("| shape | impl | ms (median) | GiB peak | vs hf-grouped_mm | vs loop | % of floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base, loop = results.get("hf-grouped_mm", (None,))[0], results.get("loop", (None,))[0]
    for impl, (ms, gib) in results.items():
        r_base = f"{base / ms:.2f}x" if base else "-"
        r_loop = f"{loop / ms:.2f}x" if loop else "-"
        print(f"| {shape} | {impl} | {ms:.2f} | {gib:.1f} | {r_base} | {r_loop} |"
              f" {100 * floor_ms / ms:.0f}% |")  # fmt: skip
    print(f"| {shape} | FLOP floor at {args.peak:.0f} TFLOP/s | {floor_ms:.2f} | | | | 100% |")
    if args.rounds > 1 and "hf-grouped_mm" in rounds:
        for impl in impls:
            ratios = [b[0] / r[0] for b, r in zip(rounds["hf-grouped_mm"], rounds[impl])]
            times = " ".join(f"{r[0]:.2f}" for r in rounds[impl])
            print(f"  {impl}: ms by round {times}; vs hf-grouped_mm by round "
                  + " ".join(f"{x:.3f}x" for x in ratios))  # fmt: skip
    for impl in impls:
        if cuda and (args.profile or args.gaps):
            print(f"## {shape} {impl}: top kernels of one forward+backward")
            with variant(impl):
                profile_block(blocks[impl], args.tokens, gaps=args.gaps)
        if args.gemms and impl == impls[0] and cuda:
            try:  # a diagnostic: never lose the layer table to it
                gemm_table(blocks[impl], args.tokens, args.peak)
            except Exception as error:
                print(f"## expert products table failed: {error!r}")
    blocks.clear()
    if cuda:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
