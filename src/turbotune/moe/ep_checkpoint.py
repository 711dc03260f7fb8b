"""Saving an expert-parallel (and FSDP2-sharded) model back to the Hugging Face layout.

Design note. After :func:`~turbotune.moe.expert_parallel.shard_experts` and FSDP2 no process
holds the whole model: FSDP2 splits every other parameter over the ranks, and each rank keeps
only its experts (outside FSDP2). :func:`full_state_dict` rebuilds the whole state dict on rank
0's CPU, with two collectives: FSDP2's full state dict (``get_model_state_dict`` with
``full_state_dict``; the expert entries it reports hold rank 0's shard only) and
:func:`~turbotune.moe.expert_parallel.gathered_expert_state` (one stack gathered at a time),
whose full stacks replace those entries. :func:`save_hf_layout` hands the result to the model's
own ``save_pretrained``, so transformers' checkpoint conventions (key renames, sharded files,
config) are its own and ``from_pretrained`` loads the directory.

Peft models: the state dict of a ``PeftModel`` is not a Hugging Face checkpoint; save its
adapter as usual (frozen experts are not part of it) or merge it before exporting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from turbotune.moe.expert_parallel import gathered_expert_state


def _is_fsdp(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full_state_dict(model: nn.Module, group: Any = None) -> dict[str, torch.Tensor]:
    """The whole state dict of an expert-parallel model on rank 0's CPU (collective).

    Args:
        model: sharded by :func:`~turbotune.moe.expert_parallel.shard_experts`, the rest
            optionally by FSDP2 (with the experts in ``ignored_params``).
        group: the expert-parallel group (default: the world; rank 0 of the world receives).

    Returns:
        ``{key: CPU tensor}`` with full expert stacks on rank 0; empty on the other ranks.
    """
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    experts = gathered_expert_state(model, group)
    if dist.get_rank() != 0:
        return {}
    missing = set(experts) - set(state)
    if missing:
        raise KeyError(f"expert stacks not in the model's state dict: {sorted(missing)}")
    state.update(experts)
    return state


def save_hf_layout(model: nn.Module, out_dir: str | Path, group: Any = None) -> None:
    """Write the model in the Hugging Face layout on rank 0 (collective; ``from_pretrained``
    loads the directory). Every rank must call it.

    Args:
        model: a ``PreTrainedModel`` sharded as :func:`full_state_dict` expects.
        out_dir: the output directory (written by rank 0 only).
        group: the expert-parallel group.
    """
    state = full_state_dict(model, group)
    if dist.get_rank() == 0:
        model.save_pretrained(str(out_dir), state_dict=state)
    dist.barrier()
