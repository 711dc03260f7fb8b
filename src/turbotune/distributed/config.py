"""The ``distributed:`` section: how a multi-process (FSDP2) run shards, offloads and loads.

One YAML section drives PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``); the
process layout itself (how many processes, which nodes) belongs to the launcher (``torchrun``,
``turbotune train --nproc N``), not to the config, so one file runs on 1, 2 or 64 GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from turbotune.errors import ConfigError

Strategy = Literal["full_shard", "hybrid_shard", "no_shard"]
Frozen = Literal["shard", "replicate"]
Groups = Literal["block", "model"]


@dataclass
class DistributedConfig:
    enabled: bool = False
    """Shard the model with FSDP2 (``torchrun`` or ``--nproc`` starts the processes); off: a
    multi-process run falls back to the Trainer's data parallelism."""
    strategy: Strategy = "full_shard"
    """``full_shard``: parameters, gradients and optimizer state split over every process;
    ``hybrid_shard``: split inside a node (``shard_size`` processes), replicated across nodes;
    ``no_shard``: replicated everywhere (data parallel on FSDP2's engine)."""
    shard_size: int | None = None
    """Processes per shard group of ``hybrid_shard``; default: ``LOCAL_WORLD_SIZE`` (one node)."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (less memory, one more all-gather in
    backward). Off keeps them until backward (ZeRO-2 like)."""
    frozen: Frozen = "shard"
    """Frozen parameters (the quantized base, embeddings, norms): ``shard`` them like the rest,
    or ``replicate`` them: every process keeps them whole, outside FSDP2 (never gathered, never
    cast), and FSDP2 shards only the trainable ones. ``replicate`` costs the base's memory on
    every GPU (~5.7 GB for an 8B NF4 base) and removes all of its all-gathers; for a base that
    fits one GPU it is the fast choice (QLoRA data parallelism)."""
    groups: Groups = "block"
    """FSDP2 groups: ``block`` shards each decoder block as its own group (all-gathers overlap
    the previous block's compute; FSDP2's hooks run per block), ``model`` makes the whole model
    one group (one all-gather before the forward, one reduce-scatter after the backward, the
    least host work; the whole trainable set is unsharded during the step — with
    ``frozen: replicate`` that is only the adapters)."""
    prefetch: int = 0
    """With ``groups: block``: blocks whose all-gathers are issued ahead of need (FSDP2's
    explicit forward and backward prefetch), so that they overlap compute even when the host
    is not ahead of the GPU; 0 keeps FSDP2's implicit prefetch (backward only, one block)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and the optimizer state in CPU memory (FSDP2's
    ``CPUOffloadPolicy``); the optimizer step then runs on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward (FSDP-aware, per block; use this instead of
    ``train.gradient_checkpointing`` in FSDP runs)."""
    activation_offload: bool = False
    """Move the activations saved for backward to (pinned) CPU memory: with activation
    checkpointing the block inputs, without it every tensor a block saves."""
    low_memory_loading: bool = True
    """Build the model on the meta device and load the checkpoint one tensor at a time,
    quantizing on the GPU and keeping only this process's shard: host memory near one tensor,
    GPU memory near this process's share of the model."""

    def validate(self) -> None:
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"'distributed.shard_size' must be positive, got {self.shard_size}")
        if self.shard_size is not None and self.strategy != "hybrid_shard":
            raise ConfigError("'distributed.shard_size' applies to strategy hybrid_shard only")
        if self.prefetch < 0:
            raise ConfigError(f"'distributed.prefetch' must be >= 0, got {self.prefetch}")
        if self.frozen == "replicate" and self.cpu_offload:
            raise ConfigError(
                "distributed.frozen=replicate keeps the frozen base on the GPU, outside FSDP2; "
                "distributed.cpu_offload moves only FSDP2's parameters: use frozen=shard with it"
            )
