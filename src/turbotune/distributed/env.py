"""The process group and the device mesh of a run started by ``torchrun``.

Design note. ``torchrun`` (or ``turbotune train --nproc N``, which starts it) sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``. turbotune joins the process group
*before* the model is built, because low-memory loading already needs to know which shard a
process keeps; accelerate and the Trainer find the group initialized and reuse it. NCCL on
GPUs, gloo on the CPU (what the tests run). A plain ``python`` start (no ``torchrun``) is a
world of one: a group of one process on a local TCP rendezvous, so the same
FSDP2 code runs, and a checkpoint saved on N processes resumes on one.

The mesh: ``full_shard`` is one dimension over every process; ``hybrid_shard`` is
``(replicate, shard)`` with the shard groups inside a node; ``no_shard`` is hybrid with shard
groups of one process (FSDP2's engine doing plain data parallelism).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from turbotune.errors import ConfigError


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits: global rank and size, rank and size on its node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls) -> WorldInfo:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        return cls(
            int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
            local_world,
        )  # fmt: skip

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(info: WorldInfo, backend: str = "auto") -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is used, else the CPU."""
    if backend in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(backend: str = "auto") -> WorldInfo:
    """Join (or create) the default process group; idempotent.

    Args:
        backend: turbotune's backend name (``cuda``/``cpu``/``auto``): NCCL on CUDA, else gloo.

    Returns:
        This process's :class:`WorldInfo`.
    """
    info = WorldInfo.from_env()
    device = device_for(info, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return info
    if "MASTER_ADDR" not in os.environ:  # a plain `python` start: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    # CUDA worlds also get gloo for CPU tensors: with FSDP2's CPU offload the gradients live on
    # the host, and collectives over them (the global norm of gradient clipping) need it.
    backend_spec = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend_spec, **kwargs)
    return info


def build_mesh(strategy: str, info: WorldInfo, device: torch.device, shard_size: int | None = None):
    """The FSDP2 device mesh of a sharding strategy.

    Args:
        strategy: ``full_shard``, ``hybrid_shard`` or ``no_shard``.
        info: the world.
        device: this process's device (its type names the mesh's device type).
        shard_size: processes per shard group (``hybrid_shard``); default one node.

    Returns:
        A 1-D mesh (``full_shard``) or a 2-D ``("replicate", "shard")`` mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = info.world_size
    if strategy == "full_shard":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    shard = 1 if strategy == "no_shard" else (shard_size or info.local_world_size)
    if world % shard:
        raise ConfigError(
            f"distributed.shard_size {shard} does not divide the {world} processes of the run"
        )
    return init_device_mesh(
        device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
