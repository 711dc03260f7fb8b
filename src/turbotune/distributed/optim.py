"""Optimizer groups and gradient clipping for a model that mixes DTensors and plain tensors.

Design note. Expert parallelism keeps the expert shards out of FSDP2 (``ignored_params``, see
:data:`turbotune.distributed.model.IGNORED_KEY`): they stay plain local tensors while the rest of
the trainable parameters (LoRA, routers) are DTensors. Two whole-set operations break on that mix:

* torch's foreach/fused optimizers (the CUDA default) group a param group's tensors by device and
  dtype only, so one ``_foreach_mul_`` receives DTensors and plain tensors and DTensor refuses
  ("got mixed torch.Tensor and DTensor"). :func:`param_groups_by_kind` splits every group into
  one group per device mesh plus one of plain tensors, each keeping its own settings (lr,
  weight decay, ...). :func:`regroup_optimizer` does the same to an optimizer already built (the
  Trainer's ``create_optimizer``), before it holds any state.
* ``clip_grad_norm_`` stacks per-tensor norms of both kinds (the same error) and, even where a
  version of transformers groups them by mesh, it counts a plain tensor's norm as if it were the
  whole parameter. An expert shard is only this rank's slice: its contribution must be summed over
  the expert-parallel group, or every rank clips by a different (too small) norm.
  :func:`clip_grad_norm_mixed` reduces each kind over the ranks it is split across.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "clip_grad_norm_mixed",
    "is_mixed",
    "param_groups_by_kind",
    "regroup_optimizer",
    "sharded_plain_params",
]


def _mesh_of(t: torch.Tensor) -> Any:
    """The tensor's device mesh, or ``None`` for a plain tensor."""
    return getattr(t, "device_mesh", None)


def is_mixed(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether ``tensors`` do not all share one device mesh (plain tensors count as one kind)."""
    return len({id(_mesh_of(t)) if _mesh_of(t) is not None else None for t in tensors}) > 1


def param_groups_by_kind(
    params_or_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Split parameters (or optimizer param groups) so that no group mixes DTensors and plain
    tensors, or DTensors of different meshes.

    Args:
        params_or_groups: parameters, or param-group dicts as ``torch.optim`` takes them.

    Returns:
        param-group dicts in the input's order; each group's settings are copied to its parts.
        Empty parts are dropped; a group with no parameters at all is kept as it was.
    """
    items = list(params_or_groups)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        by_kind: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            mesh = _mesh_of(p)
            by_kind.setdefault(id(mesh) if mesh is not None else None, []).append(p)
        if not by_kind:
            out.append({**group, "params": params})
        out.extend({**group, "params": part} for part in by_kind.values())
    return out


def regroup_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Split ``optimizer``'s param groups by kind in place (see :func:`param_groups_by_kind`).

    Call it right after the optimizer is built, before any step or scheduler (they key state
    and ``initial_lr`` by group). Returns whether anything changed.
    """
    if optimizer.state:
        raise RuntimeError("regroup_optimizer: the optimizer already holds state; regroup first")
    groups = param_groups_by_kind(optimizer.param_groups)
    if len(groups) == len(optimizer.param_groups):
        return False
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)
    return True


def sharded_plain_params(model: nn.Module) -> dict[nn.Parameter, Any]:
    """The plain (non-DTensor) parameters that hold only this rank's slice, with the process
    group they are split across: the expert shards of :func:`~turbotune.moe.expert_parallel.
    shard_experts` (group ``None`` = the world). Other plain parameters are replicas."""
    out: dict[nn.Parameter, Any] = {}
    for module in model.modules():
        ep = module.__dict__.get("_turbotune_ep")
        if ep is None:
            continue
        for p in module.parameters(recurse=False):
            if _mesh_of(p) is None:
                out[p] = ep["group"]
    return out


def _powered_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """``sum |g|^p`` over ``grads`` (``max |g|`` for p = inf), as a full (non-DTensor) tensor."""
    norm = torch.nn.utils.get_total_norm(grads, norm_type)
    if hasattr(norm, "full_tensor"):  # a DTensor norm: reduce it over its mesh
        norm = norm.full_tensor()
    norm = norm.float()  # bf16 gradients give a bf16 norm: sum the powers in fp32
    return norm if math.isinf(norm_type) else norm**norm_type


def clip_grad_norm_mixed(
    params: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    sharded: dict[Any, Any] | None = None,
) -> torch.Tensor:
    """``clip_grad_norm_`` over DTensor and plain gradients together; the norm is global.

    Args:
        params: parameters whose ``.grad`` is clipped in place (those without one are skipped).
        max_norm: the largest total norm allowed (``inf``: only measure).
        norm_type: the p of the p-norm (``inf`` allowed).
        sharded: plain parameters that are one rank's slice, mapped to the process group they
            are split across (:func:`sharded_plain_params`); their norm is reduced over it.
            Other plain parameters are taken as replicas (counted once).

    Returns:
        the total norm before clipping, a 0-dim fp32 plain tensor, equal on every rank.

    Every rank must pass the same kinds in the same order: each DTensor kind and each group of
    slices costs one collective.
    """
    sharded = sharded or {}
    kinds: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        mesh = _mesh_of(p.grad)
        # One kind per mesh, per group of plain slices, and one of replicas: each kind's norm
        # is reduced over exactly the ranks it is split across.
        if mesh is not None:
            key = ("mesh", id(mesh))
        elif p in sharded:
            key = ("slice", id(sharded[p]))
        else:
            key = ("replica", None)
        kinds.setdefault(key, []).append(p)
    if not kinds:
        return torch.tensor(0.0)
    parts = []
    for key, members in kinds.items():
        part = _powered_norm([p.grad for p in members], norm_type)
        if key[0] == "slice":
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            dist.all_reduce(part, op=op, group=sharded[members[0]])
        parts.append(part)
    device = parts[0].device
    stacked = torch.stack([part.to(device) for part in parts])
    total = stacked.max() if math.isinf(norm_type) else stacked.sum() ** (1.0 / norm_type)
    if not math.isinf(max_norm):
        for members in kinds.values():  # one call per kind: foreach cannot span the kinds
            torch.nn.utils.clip_grads_with_norm_(members, max_norm, total.to(members[0].device))
    return total
