"""One FSDP2 QLoRA measurement point, run under ``torchrun`` (or plain ``python`` for one GPU).

The model is built on the meta device from a benchmark shape (``turbotune.bench.models``),
its linears as shardable NF4 storage, turbotune's LoRA (r16, alpha 16, all linears) attached,
the fused kernels patched in, sharded with FSDP2 (``--no-fsdp``: one GPU, no sharding), then
filled with random weights created directly in 4-bit on each GPU through the low-memory path
(:class:`turbotune.distributed.RandomSource`: each tensor drawn on the GPU, quantized there,
only this GPU's shard kept). Training: AdamW lr 2e-4, bf16 autocast with fp32 LoRA weights
(FSDP2 gathers bf16, reduces fp32), random tokens; every rank draws the same global batch
and trains on its rows, so 1 and N GPUs see the same data when the global batch is the same.

Writes one JSON record (rank 0): losses per step, median step time after warm-up, tokens/s
(all GPUs and per GPU), peak GPU memory (max over ranks), host peak RSS (max over ranks),
load statistics. ``--memory-cap-gib`` caps each GPU with ``set_per_process_memory_fraction``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b", help="turbotune.bench model spec")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step over all GPUs (default batch x GPUs)")  # fmt: skip
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-fsdp", action="store_true", help="one GPU, no sharding (the baseline)")
    p.add_argument("--ddp", action="store_true",
                   help="no FSDP2: frozen base replicated, DistributedDataParallel on the adapters")  # fmt: skip
    p.add_argument(
        "--checkpointing", action="store_true", help="per-block activation checkpointing"
    )
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument(
        "--cpu-offload", action="store_true", help="FSDP2 CPU offload of params/optimizer"
    )
    p.add_argument("--no-fused", action="store_true", help="without turbotune's fused kernels")
    p.add_argument("--memory-cap-gib", type=float, default=None)
    p.add_argument("--precision", default="bf16_buffers_autocast",
                   choices=["bf16_buffers_autocast", "fp32"],
                   help="fp32: CPU host measurements without bf16 arithmetic on the CPU")  # fmt: skip
    p.add_argument("--strategy", default="full_shard",
                   choices=["full_shard", "hybrid_shard", "no_shard"])  # fmt: skip
    p.add_argument("--frozen", default="shard", choices=["shard", "replicate"],
                   help="distributed.frozen: replicate keeps the frozen base out of FSDP2")  # fmt: skip
    p.add_argument("--groups", default="block", choices=["block", "model"])
    p.add_argument("--prefetch", type=int, default=0, help="explicit prefetch depth (blocks)")
    p.add_argument("--no-reshard", action="store_true", help="reshard_after_forward off")
    p.add_argument("--profile-host", default=None,
                   help="cProfile rank 0's timed steps; write the top functions to this file")  # fmt: skip
    p.add_argument("--torch-profile", default=None,
                   help="torch.profiler of rank 0 over 2 extra steps; kernel summary to this file")  # fmt: skip
    p.add_argument("--out", required=True)
    return p.parse_args()


def _build(args, info, device):
    from turbotune.adapters.lora import apply_custom_lora
    from turbotune.bench.models import resolve_model_config
    from turbotune.config import AdapterConfig
    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.env import build_mesh
    from turbotune.distributed.loading import RandomSource, build_meta_model
    from turbotune.distributed.model import materialize_tied
    from turbotune.distributed.shard import apply_fsdp
    from turbotune.precision import resolve_precision

    plan = resolve_precision(args.precision, "cuda", adapters=True)
    dtype = plan.autocast or plan.weight_dtype  # weights, 4-bit storage and compute
    config = resolve_model_config(args.model)
    model = build_meta_model(config, dtype, quantize=True, compute_dtype=dtype, storage_dtype=dtype)
    model.config.use_cache = False
    apply_custom_lora(model, AdapterConfig(r=16, alpha=16, implementation="custom"))
    if not args.no_fused:
        from turbotune.patches import apply_patches

        model.__dict__["_turbotune_patches"] = apply_patches(
            model, ["rms_norm", "rope", "swiglu", "cross_entropy", "lora"]
        )
    dcfg = DistributedConfig(
        enabled=True, activation_checkpointing=args.checkpointing,
        activation_offload=args.offload_activations, cpu_offload=args.cpu_offload,
        strategy=args.strategy, frozen=args.frozen, groups=args.groups, prefetch=args.prefetch,
        reshard_after_forward=not args.no_reshard,
    )  # fmt: skip
    dcfg.validate()
    if not (args.no_fsdp or args.ddp):
        mesh = build_mesh(args.strategy, info, device)
        apply_fsdp(model, dcfg, plan, mesh)
    elif args.checkpointing or args.offload_activations:
        from turbotune.distributed.activations import wrap_block
        from turbotune.distributed.shard import decoder_blocks

        for block in decoder_blocks(model):
            wrap_block(block, checkpoint=args.checkpointing, offload=args.offload_activations)
    store = torch.device("cpu") if args.cpu_offload else device
    stats = materialize_tied(model, RandomSource(seed=0, dtype=dtype), store, seed=42)
    model.train()
    if args.ddp:  # PyTorch's data parallelism: only the adapters have gradients to all-reduce
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    return model, plan, stats


def _batches(args, world: int, rank: int, vocab: int, step: int, device):
    """This rank's rows of the step's global batch (the same global batch on any world size)."""
    global_batch = args.global_batch or args.batch * world
    per = global_batch // world
    gen = torch.Generator(device="cpu").manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (global_batch, args.seq), generator=gen)
    mine = ids[rank * per : (rank + 1) * per].to(device)
    return {"input_ids": mine, "labels": mine.clone()}, per


def _host_ms(phases: list[dict[str, float]]) -> dict[str, float]:
    """Host CPU ms per phase, the minimum over steps (the least disturbed), and their sum."""
    out = {k: min(p[k] for p in phases) * 1e3 for k in phases[0]}
    return {**out, "step": sum(out.values())}


def _sharded_per_block(model) -> int:
    """FSDP2-managed (DTensor) parameters of the first decoder block."""
    from turbotune.distributed.shard import decoder_blocks

    return sum(hasattr(p, "device_mesh") for p in decoder_blocks(model)[0].parameters())


# FSDP2's hook entry points (torch 2.4-2.13): their cumulative time is FSDP2's host cost,
# the collectives they wait on included (gloo runs them on the CPU).
_FSDP_HOOKS = ("_pre_forward", "_post_forward", "_pre_backward", "post_backward",
               "_root_post_backward_final_callback")  # fmt: skip


def _profile_host(step, first: int, n: int, info, path: str) -> dict:
    """cProfile of rank 0 over ``n`` steps: CPU seconds per step in FSDP2's hooks, in waits on
    collectives, and wall seconds per step (profiled)."""
    import cProfile
    import io
    import pstats

    # CPU time, not wall time: on a shared machine other processes inflate wall time.
    prof = cProfile.Profile(time.process_time) if info.is_main else None
    if prof:
        prof.enable()
    wall = sum(step(first + i) for i in range(n))
    if not prof:
        return {}
    prof.disable()
    stats = pstats.Stats(prof)
    hooks = waits = 0.0
    calls = sum(nc for (_, nc, _, _, _) in stats.stats.values())
    fsdp_calls = sum(
        nc for (file, _, _), (_, nc, _, _, _) in stats.stats.items() if "torch/distributed/" in file
    )
    for (file, _, func), (_, _, tottime, cum, _) in stats.stats.items():
        if "distributed/fsdp/_fully_shard" in file and func in _FSDP_HOOKS:
            hooks += cum
        if func.endswith("_distributed_c10d.wait>") or func == "<built-in method wait>":
            waits += tottime
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
    Path(path).write_text(text.getvalue())
    # Call counts are exact (no noise from other processes): a proxy of host work.
    return {"steps": n, "step_s_profiled": wall / n, "fsdp_hooks_s_per_step": hooks / n,
            "collective_wait_s_per_step": waits / n, "python_calls_per_step": calls // n,
            "torch_distributed_calls_per_step": fsdp_calls // n}  # fmt: skip


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in intervals)


def _profile_gpu(step, first: int, n: int, info, path: str) -> dict:
    """torch.profiler of rank 0 over ``n`` steps: GPU busy/idle time, NCCL kernel time and how
    much of it overlaps compute kernels, the top kernels and FSDP2's host ranges."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not info.is_main:
        for i in range(n):
            step(first + i)
        return {}
    with profile(activities=acts) as prof:
        wall = sum(step(first + i) for i in range(n))
    try:  # the steps ran on every rank; a parsing failure must not lose the point
        return _summarize(prof, wall, n, path)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _summarize(prof, wall: float, n: int, path: str) -> dict:
    """GPU busy/idle, NCCL and compute kernel time per step from a profile of ``n`` steps."""
    gpu, nccl, totals, host = [], [], {}, {}
    for e in prof.profiler.kineto_results.events():
        span = (e.start_ns(), e.start_ns() + e.duration_ns())
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            (nccl if "nccl" in e.name().lower() else gpu).append(span)
            totals[e.name()] = totals.get(e.name(), 0) + e.duration_ns()
        elif e.name().startswith("FSDP::"):  # one total per kind, over every module
            kind = re.sub(r" (\(.*\)|for .*)$", "", e.name())
            host[kind] = host.get(kind, 0) + e.duration_ns()
    compute, comm = _union(gpu), _union(nccl)
    busy = _length(_union(gpu + nccl))
    overlap = _length(compute) + _length(comm) - busy
    ms = 1e-6 / n  # ns over n steps -> ms per step
    summary = {
        "step_ms": wall * 1e3 / n, "gpu_busy_ms": busy * ms, "gpu_idle_ms": wall * 1e3 / n - busy * ms,
        "compute_ms": _length(compute) * ms, "nccl_kernel_ms": sum(b - a for a, b in nccl) * ms,
        "nccl_ms": _length(comm) * ms, "nccl_overlapped_ms": overlap * ms,
        "nccl_exposed_ms": (_length(comm) - overlap) * ms,
        "fsdp_host_ms": {k: v * ms for k, v in sorted(host.items(), key=lambda kv: -kv[1])},
    }  # fmt: skip
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    lines = [f"{k}: {v:.2f}" for k, v in summary.items() if not isinstance(v, dict)]
    lines += [f"host {k}: {v:.2f} ms/step" for k, v in summary["fsdp_host_ms"].items()]
    lines += ["", "top kernels (ms/step):"] + [f"{v * ms:9.2f}  {k[:120]}" for k, v in top]
    Path(path).write_text("\n".join(lines) + "\n")
    return summary


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main() -> None:
    args = _args()
    from turbotune.distributed.env import init_distributed
    from turbotune.distributed.memory import memory_report

    cuda = torch.cuda.is_available()  # the CPU runs only tiny smoke points (gloo)
    info = init_distributed("cuda" if cuda else "cpu")
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if args.memory_cap_gib and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * (1 << 30) / total, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, plan, stats = _build(args, info, device)
    _sync(cuda)
    load_s = time.perf_counter() - t0
    load_mem = memory_report()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, foreach=True)
    vocab = getattr(model, "module", model).config.vocab_size

    phases: list[dict[str, float]] = []

    def step(i: int) -> tuple[float, float, int]:
        """One training step: (wall seconds, global mean loss, rows per GPU). The process's CPU
        seconds of each phase go to ``phases``: the host's work (launches, hooks, Python), which
        other processes on a shared CPU disturb much less than wall time."""
        batch, per = _batches(args, info.world_size, info.rank, vocab, i, device)
        _sync(cuda)
        start = time.perf_counter()
        marks = [time.process_time()]
        with torch.autocast(device.type, dtype=plan.autocast, enabled=plan.autocast is not None):
            loss = model(**batch).loss
        marks.append(time.process_time())
        loss.backward()
        marks.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.process_time())
        _sync(cuda)
        seconds = time.perf_counter() - start
        names = ("forward", "backward", "optimizer")
        phases.append({n: marks[k + 1] - marks[k] for k, n in enumerate(names)})
        mean = loss.detach().float()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        return seconds, mean.item(), per

    runs = [step(i) for i in range(args.warmup + args.steps)]
    times, losses, per = [r[0] for r in runs], [r[1] for r in runs], runs[0][2]
    extra = args.warmup + args.steps
    profiles = {}
    if args.profile_host:  # after the timed steps: cProfile slows the host it measures
        profiles["host_profile"] = _profile_host(
            lambda i: step(i)[0], extra, 3, info, args.profile_host
        )
        extra += 3
    if args.torch_profile:
        profiles["gpu_profile"] = _profile_gpu(
            lambda i: step(i)[0], extra, 2, info, args.torch_profile
        )
    mem = memory_report()
    peaks = [mem.get("gpu_peak_gib", 0.0), mem["host_peak_gib"], load_mem.get("gpu_peak_gib", 0.0)]
    peaks = torch.tensor(peaks, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    step_s = statistics.median(times[args.warmup :])
    tokens = per * args.seq * info.world_size
    record = {
        "model": args.model, "gpus": info.world_size, "fsdp": not (args.no_fsdp or args.ddp), "ddp": args.ddp,
        "batch_per_gpu": per, "seq": args.seq, "checkpointing": args.checkpointing,
        "offload_activations": args.offload_activations, "cpu_offload": args.cpu_offload,
        "fused": not args.no_fused, "memory_cap_gib": args.memory_cap_gib,
        "losses": losses, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / info.world_size,
        "gpu_peak_gib": peaks[0].item(), "host_peak_gib": peaks[1].item(),
        "load_gpu_peak_gib": peaks[2].item(), "load_s": load_s, "load": stats,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "strategy": args.strategy, "frozen": args.frozen, "groups": args.groups,
        "prefetch": args.prefetch, "reshard_after_forward": not args.no_reshard,
        "sharded_params_per_block": _sharded_per_block(model), "step_times": times,
        "host_ms": _host_ms(phases[args.warmup : args.warmup + args.steps]),
        **profiles,
    }  # fmt: skip
    if info.is_main:
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "losses"}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
