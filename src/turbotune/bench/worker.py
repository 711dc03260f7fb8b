"""One benchmark point, run in its own process: ``python -m turbotune.bench.worker SPEC RESULT``.

The parent (:mod:`turbotune.bench.runner`) writes the point's spec as JSON and reads back the
result JSON; a fresh process per point means every point starts with empty device memory and
no state left by another scenario's patches. Under ``torchrun`` (points with ``gpus > 1``) each
rank trains its own batches, the LoRA/full gradients are averaged by DDP, and rank 0 writes
the result (throughput summed over ranks, memory the maximum of the ranks).

Any exception becomes a result with status ``oom`` (CUDA or host out of memory) or ``error``
and the exception's message; the traceback goes to the point's log.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the device or the host ran out of memory."""
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if t is not None
    )  # fmt: skip
    if isinstance(err, (MemoryError, *oom_types)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, memory and capability of the device the point ran on."""
    if device.type != "cuda":
        import platform

        return {"device_name": f"cpu ({platform.processor() or platform.machine()})"}
    props = torch.cuda.get_device_properties(device)
    return {
        "device_name": props.name,
        "device_memory_gib": round(props.total_memory / GIB, 1),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def _prepare(spec: dict[str, Any], config: Any, device: torch.device) -> Any:
    from turbotune.bench.setups import (
        PointSettings,
        prepare_baseline,
        prepare_turbotune,
        turbotune_config_dict,
    )

    s = PointSettings(
        gradient_checkpointing=spec["gradient_checkpointing"],
        precision=spec["precision"],
        learning_rate=spec["learning_rate"],
        lora=spec["lora"],
        attn_implementation=spec["attn_implementation"],
        seed=spec["seed"],
        batch_size=spec["batch_size"],
        output_dir=spec["output_dir"],
    )
    if spec["builtin"]:
        return prepare_baseline(spec["builtin"], config, s, device)
    return prepare_turbotune(turbotune_config_dict(spec["config"], s), config, s, device)


def _batches(spec: dict[str, Any], vocab: int, n: int, rank: int, device: torch.device) -> list:
    from turbotune.bench.data import dataset_batches, random_batches

    seed = spec["seed"] + 1000 * rank
    packed = padding_free(spec.get("config"))
    if spec["data"] in (None, "random"):
        return random_batches(
            vocab, spec["batch_size"], spec["seq_len"], n, seed=seed, device=device,
            padding_free=packed,
        )  # fmt: skip
    if not spec.get("tokenizer"):
        raise ValueError("a dataset file needs 'tokenizer' (a tokenizer directory) in the scenario")
    return dataset_batches(
        spec["data"], spec["tokenizer"], spec["batch_size"], spec["seq_len"], n,
        vocab_size=vocab, seed=seed, device=device, padding_free=packed,
    )  # fmt: skip


def padding_free(config: dict[str, Any] | None) -> bool:
    """Whether a scenario's turbotune config turns the ``padding_free`` plugin on (its batches
    are then the same rows packed into one row)."""
    plugins = (config or {}).get("plugins") or {}
    if "padding_free" not in plugins:
        return False
    section = plugins["padding_free"] or {}
    return section.get("enabled", True) is not False


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, train and time one point; the measured numbers (see :mod:`.report` for columns)."""
    import peft  # noqa: F401 - imported before the clock: load time is the model build only
    import transformers  # noqa: F401

    from turbotune.bench.build import count_params
    from turbotune.bench.data import effective_seq_len
    from turbotune.bench.loop import MemoryMeter, timed_loop
    from turbotune.bench.models import resolve_model_config
    from turbotune.train.flops import count_lora_params, peak_flops, train_flops_per_token

    rank, world, local = _distributed()
    device = _device(local)
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    config = resolve_model_config(spec["model"])
    prepared = _prepare(spec, config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_time = time.perf_counter() - start
    model = prepared.model
    counts = count_params(model)
    lora_params = count_lora_params(model)
    if world > 1:
        model = _wrap_ddp(model, local, device)
    n = spec["warmup"] + spec["steps"]
    batches = _batches(spec, config.vocab_size, n, rank, device)
    res = timed_loop(
        model, batches, warmup=spec["warmup"], steps=spec["steps"],
        learning_rate=spec["learning_rate"], autocast=prepared.autocast, device=device,
        meter=MemoryMeter(device),
    )  # fmt: skip
    per_gpu = res.tokens_per_s
    seq_eff = effective_seq_len(batches[spec["warmup"] :])
    flops = train_flops_per_token(
        config, seq_eff, trainable=prepared.trainable, lora_params=lora_params
    )
    hw_flops = train_flops_per_token(
        config, seq_eff, trainable=prepared.trainable, lora_params=lora_params,
        checkpointing=spec["gradient_checkpointing"],
    )  # fmt: skip
    peak = peak_flops(device, measured=True)
    alloc, reserved, total = res.peak_allocated, res.peak_reserved, per_gpu
    if world > 1:
        alloc, reserved, total = _reduce(alloc, reserved, per_gpu, device)
    return {
        "status": "ok",
        "error": "",
        "precision": prepared.precision,
        "tokens_per_s": total,
        "tokens_per_s_per_gpu": total / world,
        "step_time_median_s": res.median_step_time,
        "step_time_mean_s": sum(res.step_times) / len(res.step_times),
        "wall_time_s": res.wall_time,
        "tokens_per_step": sum(res.step_tokens) / len(res.step_tokens),
        "seq_len_effective": seq_eff,
        "flops_per_token": flops,
        "mfu": (total / world) * flops / peak if peak else None,
        "hfu": (total / world) * hw_flops / peak if peak else None,
        "peak_flops": peak,
        "peak_allocated_gib": alloc / GIB,
        "peak_reserved_gib": reserved / GIB,
        "load_time_s": load_time,
        "trainable_params": counts["trainable_params"],
        "param_gib": counts["param_bytes"] / GIB,
        "losses": res.losses,
        "world_size": world,
        **device_info(device),
    }


def _wrap_ddp(model: torch.nn.Module, local: int, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable weights. Every rank built identical weights (seeded by name), so
    the initial broadcast (35 GB for a 70B model) is skipped where torch allows it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict[str, Any] = {"device_ids": [local] if device.type == "cuda" else None}
    if "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["init_sync"] = False
    return DistributedDataParallel(model, **kwargs)


def _reduce(alloc: int, reserved: int, tps: float, device: torch.device) -> tuple[int, int, float]:
    import torch.distributed as dist

    mem = torch.tensor([alloc, reserved], dtype=torch.float64, device=device)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    speed = torch.tensor([tps], dtype=torch.float64, device=device)
    dist.all_reduce(speed, op=dist.ReduceOp.SUM)
    return int(mem[0]), int(mem[1]), float(speed[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m turbotune.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[1]) if rank == 0 else Path(f"{argv[1]}.rank{rank}")
    try:
        result = run_point(spec)
    except BaseException as err:  # every failure, even Ctrl-C, becomes a recorded result
        traceback.print_exc()
        status = "oom" if is_oom(err) else "error"
        result = {"status": status, "error": error_line(err)}
        out.write_text(json.dumps(result))
        return 1
    if rank == 0:
        out.write_text(json.dumps(result))
        print(
            f"[bench] {spec['scenario']} {spec['point']}: {result['tokens_per_s']:.0f} tokens/s, "
            f"peak {result['peak_allocated_gib']:.2f} GiB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
