"""MoE layer forward+backward at the Mixtral-8x7B and Qwen3-30B-A3B shapes, one table.

Each point is transformers' own sparse MoE block (router + experts, bf16, every parameter
trainable, 8192 tokens) with its experts computed by:

- ``hf-grouped_mm`` / ``hf-eager``: transformers' ``config._experts_implementation``;
- ``loop``: a plain per-expert loop (``turbotune.moe.reference``);
- ``tt-grouped_mm`` / ``tt-triton`` / ``tt-auto``: turbotune's experts patch with that backend.

Timing: CUDA events around forward+backward, median of ``--iters`` after ``--warmup`` (the
Triton autotuner runs during warmup). ``--frozen`` times the QLoRA/LoRA case (expert stacks
frozen: no weight-gradient products). The FLOP floor is ``6 * T * k * 3 * H * I`` (forward 2 FLOP
per multiply-add for 3 projections, backward twice that) at ``--peak`` TFLOP/s.

    python benchmarks/moe_layer.py                      # both shapes, all implementations
    python benchmarks/moe_layer.py --shapes qwen3 --impls hf-grouped_mm,tt-triton --iters 50
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

SHAPES = {  # name: (config class, block class, hidden, intermediate, experts, top-k)
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock", 4096, 14336, 8, 2),
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", 2048, 768, 128, 8),
}
IMPLS = ["hf-grouped_mm", "hf-eager", "loop", "tt-grouped_mm", "tt-triton", "tt-auto"]


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


def _set_experts(experts: torch.nn.Module, impl: str) -> None:
    if impl.startswith("tt-"):
        from turbotune.moe.patch import experts_forward
        from turbotune.patches.engine import PatchSet

        PatchSet("bench").bind(experts, "moe", experts_forward(impl[3:]))
    elif impl == "loop":
        from turbotune.moe.reference import moe_experts_reference

        def loop(self, hidden, index, weights):
            return moe_experts_reference(hidden, index, weights, self.gate_up_proj, self.down_proj)

        experts.forward = types.MethodType(loop, experts)


def time_block(block: torch.nn.Module, tokens: int, warmup: int, iters: int):
    """Median milliseconds of forward+backward and the peak memory (GiB) over the timed runs."""
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
    parser.add_argument("--peak", type=float, default=790.0, help="dense bf16 TFLOP/s (measured)")
    parser.add_argument("--frozen", action="store_true", help="expert stacks frozen (LoRA/QLoRA)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (use --shrink)")
    parser.add_argument("--shrink", type=int, default=1, help="divide hidden/intermediate by this")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# {gpu} torch {torch.__version__} tokens {args.tokens} bf16 fwd+bwd"
          f"{' frozen experts' if args.frozen else ''}")  # fmt: skip
    header = "| shape | impl | ms (median) | GiB peak | vs hf-grouped_mm | vs loop | % of floor |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        _, _, hidden, inter, _, k = SHAPES[shape]
        hidden, inter = hidden // args.shrink, inter // args.shrink
        multiplier = 4 if args.frozen else 6  # no weight-gradient products when frozen
        floor_ms = multiplier * args.tokens * k * 3 * hidden * inter / (args.peak * 1e12) * 1e3
        results = {}
        for impl in args.impls.split(","):
            block = build_block(shape, impl, args.frozen, args.device, args.shrink)
            try:
                results[impl] = time_block(block, args.tokens, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                results[impl] = (float("nan"), float("nan"))
            del block
            if args.device == "cuda":
                torch.cuda.empty_cache()
        base, loop = results.get("hf-grouped_mm", (None,))[0], results.get("loop", (None,))[0]
        for impl, (ms, gib) in results.items():
            r_base = f"{base / ms:.2f}x" if base else "-"
            r_loop = f"{loop / ms:.2f}x" if loop else "-"
            print(f"| {shape} | {impl} | {ms:.2f} | {gib:.1f} | {r_base} | {r_loop} |"
                  f" {100 * floor_ms / ms:.0f}% |")  # fmt: skip
        print(f"| {shape} | FLOP floor at {args.peak:.0f} TFLOP/s | {floor_ms:.2f} | | | | 100% |")


if __name__ == "__main__":
    main()
