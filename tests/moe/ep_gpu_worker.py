"""Expert parallelism on 2 GPUs with NCCL, one process per GPU (run by ``torchrun``; see
tests/moe/test_ep_gpu.py): ``torchrun --nproc-per-node 2 tests/moe/ep_gpu_worker.py OUT BACKEND``.

1. The tiny-model checks of :mod:`tests.moe.ep_fsdp_worker` (expert parallelism + FSDP2: per-step
   losses and every LoRA/router/expert gradient equal one process, HF-layout export, the config
   path) on the GPUs.
2. One MoE layer at the Qwen3-30B-A3B shape (hidden 2048, intermediate 768, 128 experts, top-8,
   2048 tokens per rank) in bf16: the expert-parallel output and gradients (input, routing
   weights, this rank's expert shards) against an fp32 single-GPU run of all ranks' tokens, with
   an error at most twice that of the same computation in bf16 on one GPU (the flash-attention
   rule of the other MoE GPU tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable under torchrun

from tests.moe import ep_fsdp_worker

from turbotune.moe import moe_experts, route
from turbotune.moe.expert_parallel import expert_parallel_experts

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 2048, 768, 128, 8, 2048


def _global_inputs(world: int, device: torch.device):
    """The same inputs on every rank (one seed): all ranks' tokens, routing, stacks, grads."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(world * TOKENS, HIDDEN, device=device, generator=gen)
    router = torch.randn(EXPERTS, HIDDEN, device=device, generator=gen) * HIDDEN**-0.5
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=device, generator=gen) * HIDDEN**-0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, device=device, generator=gen) * INTER**-0.5
    grad = torch.randn(world * TOKENS, HIDDEN, device=device, generator=gen)
    routed = route(x, router, TOP_K)  # fp32 routing once: no top-k flips between runs
    return x, routed.index, routed.weights, gate_up, down, grad


def _single(inputs, dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
    """One GPU, every rank's tokens: output and gradients (x, weights, gate_up, down)."""
    x, index, weights, gate_up, down, grad = inputs
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, weights, gate_up, down)]
    out = moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3], backend=backend)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _expert_parallel(inputs, rank: int, world: int, backend: str) -> list[torch.Tensor]:
    """This rank's tokens and experts, bf16, through the all-to-all layer."""
    x, index, weights, gate_up, down, grad = inputs
    mine, local = slice(rank * TOKENS, (rank + 1) * TOKENS), EXPERTS // world
    own = slice(rank * local, (rank + 1) * local)
    leaves = [t.detach().to(torch.bfloat16).clone().requires_grad_()
              for t in (x[mine], weights[mine], gate_up[own], down[own])]  # fmt: skip
    out = expert_parallel_experts(leaves[0], index[mine], leaves[1], leaves[2], leaves[3],
                                  num_experts=EXPERTS, backend=backend)  # fmt: skip
    out.backward(grad[mine].to(torch.bfloat16))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def check_layer(rank: int, world: int, device: torch.device, backend: str) -> None:
    inputs = _global_inputs(world, device)
    ref = _single(inputs, torch.float32, "loop")  # cuBLAS fp32 per expert (no TF32 by default)
    eager = _single(inputs, torch.bfloat16, backend)
    ours = _expert_parallel(inputs, rank, world, backend)
    mine, local = slice(rank * TOKENS, (rank + 1) * TOKENS), EXPERTS // world
    own = slice(rank * local, (rank + 1) * local)
    parts = (mine, mine, mine, own, own)
    names = ("out", "grad_x", "grad_weights", "grad_gate_up", "grad_down")
    for name, part, r, e, o in zip(names, parts, ref, eager, ours, strict=True):
        err_one = (e[part] - r[part]).abs().max().item()
        err_ep = (o - r[part]).abs().max().item()
        assert err_ep <= 2 * err_one + 1e-6, (
            f"rank {rank} {backend} {name}: expert-parallel max abs err {err_ep:.3e} vs one GPU "
            f"bf16 {err_one:.3e} (mean {(o - r[part]).abs().mean():.3e})"
        )


def main() -> None:
    from turbotune.distributed.env import device_for, init_distributed

    out_dir, backend = sys.argv[1], sys.argv[2]
    info = init_distributed("cuda")
    device = device_for(info, "cuda")
    try:
        tiny_backend = "triton" if backend == "grouped_mm" else backend  # fp32 tiny model
        ep_fsdp_worker.check(info.rank, info.world_size, out_dir, tiny_backend, device)
        check_layer(info.rank, info.world_size, device, backend)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {info.rank}: expert-parallel GPU checks passed ({backend})")


if __name__ == "__main__":
    main()
