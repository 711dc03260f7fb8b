"""Sharded checkpoints (DCP) of the trainable state, and the gathered PEFT adapter export.

Design note. A checkpoint holds what training changes: the trainable parameters and the
optimizer state, each process writing its own shards through ``torch.distributed.checkpoint``
(DCP) into ``<checkpoint>/sharded/``. Frozen base weights are never written (a 70B base would
be 35 GB per checkpoint, and it is rebuilt from the model path on resume). DCP stores global
shapes with each shard, so a checkpoint written by N processes loads on M, one included:
``torch.distributed.checkpoint.state_dict`` gives and takes the state under the model's own
parameter names (FSDP2 adds no prefixes), and the optimizer state keyed by those names.

The adapter export gathers the full trainable weights to rank 0 (``full_state_dict`` with CPU
offload: only rank 0 holds them) — a collective every rank joins — and rank 0 writes the PEFT
files through the model's own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SHARDED_DIR", "gather_trainable", "has_sharded_state", "load_sharded", "save_sharded"]

SHARDED_DIR = "sharded"
"""Sub-directory of a checkpoint that holds the DCP shards."""


def _options(*, full: bool = False, frozen: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=full, cpu_offload=full, ignore_frozen_params=not frozen, strict=False
    )


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate wraps the optimizer; DCP wants the torch one."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _trainable_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without any frozen parameter. ``ignore_frozen_params`` drops each frozen
    parameter under one name only (torch walks ``named_parameters()``, which skips the aliases
    of shared parameters): a tied LM head (``lm_head.weight``, the embedding matrix) stayed in
    every checkpoint. turbotune adds no wrapper modules (activation checkpointing wraps
    ``forward`` only), so parameter names are the state dict's keys."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def save_sharded(model: nn.Module, optimizer: Any, checkpoint_dir: str | Path) -> Path:
    """Write the trainable parameters and the optimizer state of every process (collective).

    Args:
        model: the sharded model.
        optimizer: its optimizer (an accelerate wrapper is unwrapped), or ``None``.
        checkpoint_dir: the checkpoint folder; shards go to ``<checkpoint_dir>/sharded``.

    Returns:
        The folder of the shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    out = Path(checkpoint_dir) / SHARDED_DIR
    if optimizer is None:
        state = {"model": _trainable_state(model, get_model_state_dict(model, options=_options()))}
    else:
        msd, osd = get_state_dict(model, _inner(optimizer), options=_options())
        state = {"model": _trainable_state(model, msd), "optim": osd}
    dcp.save(state, checkpoint_id=str(out))
    return out


def has_sharded_state(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / SHARDED_DIR / ".metadata").is_file()


def load_sharded(model: nn.Module, optimizer: Any, checkpoint_dir: str | Path) -> None:
    """Load what :func:`save_sharded` wrote, resharded to this run's processes (collective).

    Args:
        model: the sharded model (same trainable parameter names as when saved).
        optimizer: its optimizer, or ``None`` to load the parameters only.
        checkpoint_dir: the checkpoint folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    where = str(Path(checkpoint_dir) / SHARDED_DIR)
    if optimizer is None:
        state = {"model": _trainable_state(model, get_model_state_dict(model, options=_options()))}
        dcp.load(state, checkpoint_id=where)
        set_model_state_dict(model, state["model"], options=_options())
        return
    opt = _inner(optimizer)
    msd, osd = get_state_dict(model, opt, options=_options())
    state = {"model": _trainable_state(model, msd), "optim": osd}
    dcp.load(state, checkpoint_id=where)
    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=_options(),
    )  # fmt: skip


def gather_trainable(model: nn.Module, *, frozen: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable parameters on rank 0's CPU; empty on other ranks (collective).

    Args:
        model: the sharded model.
        frozen: include frozen parameters too (full fine-tuning exports the whole model).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(full=True, frozen=frozen))
    return state if frozen else _trainable_state(model, state)
