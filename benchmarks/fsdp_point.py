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
    p.add_argument(
        "--checkpointing", action="store_true", help="per-block activation checkpointing"
    )
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument(
        "--cpu-offload", action="store_true", help="FSDP2 CPU offload of params/optimizer"
    )
    p.add_argument("--no-fused", action="store_true", help="without turbotune's fused kernels")
    p.add_argument("--memory-cap-gib", type=float, default=None)
    p.add_argument("--out", required=True)
    return p.parse_args()


def _build(args, info, device):
    from turbotune.adapters.lora import apply_custom_lora
    from turbotune.bench.models import resolve_model_config
    from turbotune.config import AdapterConfig
    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.env import build_mesh
    from turbotune.distributed.loading import RandomSource, build_meta_model, materialize
    from turbotune.distributed.shard import apply_fsdp
    from turbotune.precision import resolve_precision

    plan = resolve_precision("bf16_buffers_autocast", "cuda", adapters=True)
    config = resolve_model_config(args.model)
    model = build_meta_model(config, torch.bfloat16, quantize=True, compute_dtype=torch.bfloat16,
                             storage_dtype=torch.bfloat16)  # fmt: skip
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
    )  # fmt: skip
    if not args.no_fsdp:
        mesh = build_mesh("full_shard", info, device)
        apply_fsdp(model, dcfg, plan, mesh)
    elif args.checkpointing or args.offload_activations:
        from turbotune.distributed.activations import wrap_block
        from turbotune.distributed.shard import decoder_blocks

        for block in decoder_blocks(model):
            wrap_block(block, checkpoint=args.checkpointing, offload=args.offload_activations)
    store = torch.device("cpu") if args.cpu_offload else device
    stats = materialize(model, RandomSource(seed=0, dtype=torch.bfloat16), store, seed=42)
    model.train()
    return model, plan, stats


def _batches(args, world: int, rank: int, vocab: int, step: int, device):
    """This rank's rows of the step's global batch (the same global batch on any world size)."""
    global_batch = args.global_batch or args.batch * world
    per = global_batch // world
    gen = torch.Generator(device="cpu").manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (global_batch, args.seq), generator=gen)
    mine = ids[rank * per : (rank + 1) * per].to(device)
    return {"input_ids": mine, "labels": mine.clone()}, per


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
    losses, times = [], []
    vocab = model.config.vocab_size
    for step in range(args.warmup + args.steps):
        batch, per = _batches(args, info.world_size, info.rank, vocab, step, device)
        _sync(cuda)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=plan.autocast):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(cuda)
        times.append(time.perf_counter() - start)
        mean = loss.detach().float()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    mem = memory_report()
    peaks = [mem.get("gpu_peak_gib", 0.0), mem["host_peak_gib"], load_mem.get("gpu_peak_gib", 0.0)]
    peaks = torch.tensor(peaks, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    step_s = statistics.median(times[args.warmup :])
    tokens = per * args.seq * info.world_size
    record = {
        "model": args.model, "gpus": info.world_size, "fsdp": not args.no_fsdp,
        "batch_per_gpu": per, "seq": args.seq, "checkpointing": args.checkpointing,
        "offload_activations": args.offload_activations, "cpu_offload": args.cpu_offload,
        "fused": not args.no_fused, "memory_cap_gib": args.memory_cap_gib,
        "losses": losses, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / info.world_size,
        "gpu_peak_gib": peaks[0].item(), "host_peak_gib": peaks[1].item(),
        "load_gpu_peak_gib": peaks[2].item(), "load_s": load_s, "load": stats,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
    }  # fmt: skip
    if info.is_main:
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "losses"}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
