"""One rank of the expert-parallel test (run by ``torch.multiprocessing.spawn`` with gloo)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from tests.moe.tiny import sparse_blocks, tiny_model
from transformers import AutoModelForCausalLM

from turbotune.moe.expert_parallel import expert_parameters, gather_experts, shard_experts


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5) -> None:
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= atol, f"{name}: max abs diff {diff.max():.3e} mean {diff.mean():.3e}"


def _experts(block: torch.nn.Module) -> torch.nn.Module:
    return block.experts


def run(rank: int, world: int, port: int, out_dir: str, backend: str, cuda: bool = False) -> None:
    torch.set_num_threads(1)
    # Eager SwiGLU in the workers: the interpreter is tested elsewhere and slow.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        _check(rank, world, out_dir, backend, device)
    finally:
        dist.destroy_process_group()


def _check(rank: int, world: int, out_dir: str, backend: str, device: torch.device) -> None:
    model = tiny_model("qwen3_moe").to(device)  # same seed on every rank: 8 experts, 4 per rank
    reference = copy.deepcopy(model)
    pristine = copy.deepcopy(model)
    block, ref_block = sparse_blocks(model)[0], sparse_blocks(reference)[0]
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    xs, grads = torch.randn(2, world * 2, 5, hidden, generator=gen).to(device)
    # Reference: every rank's tokens through transformers' full block in one process.
    x_all = xs.clone().requires_grad_()
    ref_block(x_all).backward(grads)
    mine = slice(rank * 2, rank * 2 + 2)

    patches = shard_experts(model, backend=backend)
    assert patches.counts == {"moe_ep": 2}
    assert len(expert_parameters(model)) == 4  # 2 layers x (gate_up, down): FSDP2's ignored set
    local = 8 // world
    assert _experts(block).gate_up_proj.shape[0] == local
    x = xs[mine].clone().requires_grad_()
    out = block(x)
    out.backward(grads[mine])
    _close("output", out.detach(), ref_block(xs)[mine].detach())
    _close("grad input", x.grad, x_all.grad[mine])
    router_grad = block.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # replicated router: data-parallel sum
    _close("grad router (summed over ranks)", router_grad, ref_block.gate.weight.grad)
    own = slice(rank * local, (rank + 1) * local)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(_experts(block), name).grad
        _close(f"grad {name} shard", got, getattr(_experts(ref_block), name).grad[own])

    # One SGD step on the expert shards, gathered and saved in the Hugging Face layout.
    with torch.no_grad():
        for m in (block, ref_block):
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(_experts(m), name)
                p -= 0.5 * p.grad
    _check_average_grads(pristine, block, xs[mine], grads[mine], world, backend)
    patches.undo()
    gather_experts(model)
    if rank == 0:
        model.save_pretrained(out_dir)
        loaded = AutoModelForCausalLM.from_pretrained(out_dir)
        loaded_block = sparse_blocks(loaded)[0]
        for name in ("gate_up_proj", "down_proj"):
            saved = getattr(_experts(loaded_block), name).to(device)
            _close(f"saved {name} vs gathered", saved, getattr(_experts(block), name), 0.0)
            _close(f"saved {name} vs one-process step", saved, getattr(_experts(ref_block), name))
        _close("saved layer-1 experts", sparse_blocks(loaded)[1].experts.down_proj.to(device),
               sparse_blocks(reference)[1].experts.down_proj, 0.0)  # fmt: skip
    dist.barrier()


def _check_average_grads(pristine, block, x, grad, world: int, backend: str) -> None:
    """``shard_experts(average_grads=True)``: the shard gradients divided by the group size."""
    shard_experts(pristine, backend=backend, average_grads=True)
    averaged = sparse_blocks(pristine)[0]
    averaged(x).backward(grad)
    for name in ("gate_up_proj", "down_proj"):
        want = getattr(block.experts, name).grad / world
        _close(f"averaged grad {name}", getattr(averaged.experts, name).grad, want)
