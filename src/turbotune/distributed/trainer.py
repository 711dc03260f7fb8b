"""How an FSDP2-sharded model meets the Hugging Face Trainer.

Design note — the choice. Two ways exist: accelerate's FSDP2 path (``TrainingArguments(fsdp=...,
fsdp_config={"fsdp_version": 2})``), or sharding the model ourselves and handing the Trainer an
already-distributed model. turbotune does the second, because the first does not fit:

* accelerate turns FSDP on only for accelerator-type worlds (CUDA, XPU, ...), never for a gloo
  CPU world, so the CPU proof (2 processes, parity of losses, resume) could not run it;
* its ``fully_shard`` pass would shard *after* the Trainer sees the model, too late for
  low-memory loading (a meta-device model whose shards are filled tensor by tensor) and for
  4-bit storage that must be quantized in the gather dtype;
* its checkpoints save a custom-LoRA model in full (the frozen 4-bit base included), and its
  ``save_model`` under sharded state dicts writes no adapter at all;
* transformers 5.23 can skip DDP for a model distributed at load time, but 5.17 (the GPU
  machine) cannot.

So :func:`~turbotune.distributed.shard.apply_fsdp` shards the model before the Trainer is built,
the Trainer runs in its ordinary multi-process (DDP) mode — its sampler shards the data, its
loss normalization and gradient clipping are the DDP ones, and ``clip_grad_norm_`` works on
DTensor gradients — and :class:`FsdpTrainer` changes exactly five things:

1. ``_wrap_model`` returns a :class:`ShardedModel` instead of letting accelerate wrap DDP
   around DTensors (a wrapped model skips ``accelerator.prepare`` for the model); its forward
   runs under the precision plan's autocast, which accelerate would otherwise have added;
2. ``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler`` write and read the
   trainable parameters and the optimizer state through DCP (:mod:`.checkpoint`), which
   reshards to any number of processes;
3. ``_load_from_checkpoint`` reads the DCP parameters (not the PEFT files);
4. ``save_model`` gathers the full adapter to rank 0 (a collective: every rank calls it) and
   rank 0 writes the PEFT files; ``gather_for_save`` lets the caller do the collective part on
   every rank and the atomic write on rank 0 only;
5. ``create_optimizer`` and ``_mixed_mesh_grad_norm`` handle a model whose trainable
   parameters mix DTensors and plain tensors (expert shards under expert parallelism):
   separate param groups per kind, and a norm reduced over the ranks each kind spans
   (:mod:`.optim`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from turbotune.distributed.checkpoint import (
    gather_trainable,
    has_sharded_state,
    load_sharded,
    save_sharded,
)
from turbotune.distributed.optim import (
    clip_grad_norm_mixed,
    regroup_optimizer,
    sharded_plain_params,
)
from turbotune.train.trainer import TurbotuneTrainer

__all__ = ["FsdpTrainer", "ShardedModel"]


class ShardedModel(nn.Module):
    """What the Trainer trains: the FSDP2 model, under autocast when the plan asks, no DDP.

    Args:
        module: the sharded model.
        autocast: the precision plan's autocast dtype, or ``None``.
    """

    def __init__(self, module: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.module = module
        self.autocast = autocast

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.autocast is None:
            return self.module(*args, **kwargs)
        # The compute device (sharded parameters may live on the CPU under CPU offload).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device, dtype=self.autocast):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: keep unsharded gradients until the last micro-batch."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


class FsdpTrainer(TurbotuneTrainer):
    """``TurbotuneTrainer`` for a model sharded by :func:`~turbotune.distributed.apply_fsdp`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._gathered: dict[str, torch.Tensor] | None = None

    # --- the model the loop runs ------------------------------------------------------------

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None):
        if isinstance(model, ShardedModel):
            return model
        plan = model.__dict__.get("_turbotune_fsdp", {}).get("plan")
        return ShardedModel(model, getattr(plan, "autocast", None))

    # --- the optimizer and gradient clipping over DTensors and plain tensors ------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer with no param group mixing DTensors and plain tensors (expert
        shards stay plain under expert parallelism), so foreach/fused steps work."""
        built = self.optimizer is None  # a caller's own optimizer (and scheduler) is kept as is
        optimizer = super().create_optimizer(model)
        if (
            built
            and isinstance(optimizer, torch.optim.Optimizer)
            and regroup_optimizer(optimizer)
            and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        ):
            for group in optimizer.param_groups:
                if not group.get("fused"):
                    # transformers 5.17 turns foreach off for a mixed model; each group is one
                    # kind now, so torch's default (foreach on CUDA) is safe again.
                    group["foreach"] = None
        return optimizer

    def _mixed_mesh_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # transformers counts a plain gradient's norm as the whole parameter's; an expert shard
        # is one rank's slice, reduced over its expert-parallel group here.
        module = model.module if isinstance(model, ShardedModel) else model
        return clip_grad_norm_mixed(
            model.parameters(), max_norm, sharded=sharded_plain_params(module)
        )

    # --- checkpoints --------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from transformers.trainer import SCHEDULER_NAME

        save_sharded(self.model, self.optimizer, output_dir)
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from transformers.trainer import SCHEDULER_NAME

        if checkpoint is None:
            return
        load_sharded(self.model, self.optimizer, checkpoint)
        path = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(path):
            self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not has_sharded_state(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} holds no sharded state ({resume_from_checkpoint}/sharded); "
                "an FSDP run resumes from checkpoints written by an FSDP run"
            )
        target = model if model is not None else self.model
        if isinstance(target, ShardedModel):
            target = target.module
        load_sharded(target, None, resume_from_checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # The last per-rank file of a checkpoint: rank 0 publishes the folder only after this.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    # --- the adapter (or model) export ----------------------------------------------------------

    def gather_for_save(self) -> None:
        """Gather the full trainable weights to rank 0 (collective: call it on every rank)."""
        self._gathered = gather_trainable(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the PEFT adapter (or the model) from rank 0; gathers first unless
        :meth:`gather_for_save` already did (then only rank 0 needs to call it)."""
        state, self._gathered = self._gathered, None
        if state is None:
            state = gather_trainable(self.model)
        if not self.args.should_save:
            return
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
