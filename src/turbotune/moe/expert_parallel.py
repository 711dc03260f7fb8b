"""Expert parallelism: each rank holds ``E / world`` experts; tokens travel by all-to-all.

Design note. The router stays replicated (every rank routes its own tokens with transformers'
router module, so router logits and the auxiliary loss are unchanged); only the experts module is
sharded and replaced. One layer forward on rank r:

1. sort the rank's ``T * k`` slots by expert (:mod:`turbotune.moe.plan`): since rank q owns the
   contiguous experts ``q * E_local .. (q + 1) * E_local - 1``, the sorted rows are already grouped
   by destination rank;
2. exchange the per-expert counts (one small all-to-all), then the token rows (all-to-all with
   uneven splits; the split sizes are the one host sync);
3. the received rows are grouped by source rank, then by local expert: they run through the same
   grouped kernels as a single GPU (:func:`~turbotune.moe.experts.moe_experts` with ``k = 1`` and
   unit weights);
4. the results go back by the reverse all-to-all and are combined with the routing weights on
   the rank that owns the tokens (so the routing weights, hence the router, get their gradient).

Autograd: the all-to-all of rows is :class:`_AllToAll`, whose backward is the reverse exchange.
Gradients of the expert shards are complete on their owner (they saw every rank's tokens); all
other parameters are replicated and need the usual data-parallel reduction (DDP/FSDP2). Gloo
(CPU) and NCCL both implement ``all_to_all_single`` with uneven splits (gloo checked on torch
2.13). Saving: :func:`gather_experts` rebuilds the full stacks (``all_gather``) so
``save_pretrained`` writes the Hugging Face layout; :func:`gathered_expert_state` gathers them
on one rank only (what :mod:`turbotune.moe.ep_checkpoint` writes beside FSDP2's full state
dict). Combined with FSDP2 (experts sharded by EP, the rest by FSDP): FSDP2 skips
:func:`expert_parameters` (``apply_fsdp(..., ignored_params=...)``), and ``average_grads`` makes
the shards' gradients the mean over ranks that FSDP2 gives the rest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from turbotune.moe.combine import combine_rows
from turbotune.moe.experts import BackendChoice, moe_experts
from turbotune.moe.patch import activation_of
from turbotune.moe.plan import plan_experts
from turbotune.patches.engine import PatchSet, family_of


class _AllToAll(torch.autograd.Function):
    """Rows exchanged with uneven splits; the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def expert_parallel_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_local: torch.Tensor,
    down_local: torch.Tensor,
    *,
    num_experts: int,
    group: Any = None,
    activation: Any = "silu",
    backend: BackendChoice = "auto",
) -> torch.Tensor:
    """The experts of one MoE layer with the experts sharded over ``group``.

    Args:
        hidden: ``[T, H]`` this rank's tokens.
        top_k_index: ``[T, k]`` global expert ids.
        top_k_weights: ``[T, k]`` routing weights.
        gate_up_local: ``[E_local, 2I, H]`` this rank's experts (rank r owns experts
            ``r * E_local ..``); ``down_local``: ``[E_local, H, I]``.
        num_experts: ``E`` (all ranks).
        group: the expert-parallel process group (default: the world).

    Returns:
        ``[T, H]`` tensor of ``hidden.dtype``.
    """
    world = dist.get_world_size(group)
    local = num_experts // world
    plan = plan_experts(top_k_index, num_experts)
    recv_counts = torch.empty_like(plan.counts)
    dist.all_to_all_single(recv_counts, plan.counts, group=group)  # [world * E_local] by source
    send_splits = plan.counts.view(world, local).sum(1).tolist()
    recv_by_source = recv_counts.view(world, local)
    recv_splits = recv_by_source.sum(1).tolist()
    rows = _AllToAll.apply(hidden[plan.tokens], send_splits, recv_splits, group)
    expert_of_row = torch.arange(local, device=rows.device).repeat(world)
    expert_of_row = expert_of_row.repeat_interleave(recv_by_source.reshape(-1))
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    out_rows = moe_experts(
        rows, expert_of_row[:, None], ones, gate_up_local, down_local,
        activation=activation, backend=backend,
    )  # fmt: skip
    back = _AllToAll.apply(out_rows, recv_splits, send_splits, group)  # sorted like plan.order
    return combine_rows(back, plan.row_of_slot, top_k_weights, hidden.dtype)


def _ep_forward(backend: BackendChoice):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        ep = self.__dict__.get("_turbotune_ep")
        if ep is None:  # gathered again (gather_experts): the full stacks are local
            return self._turbotune_original_forward(hidden_states, top_k_index, top_k_weights)
        return expert_parallel_experts(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
            num_experts=ep["num_experts"], group=ep["group"], activation=activation_of(self),
            backend=backend,
        )  # fmt: skip

    return forward


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    _, fam = family_of(model)
    return [m for m in model.modules() if type(m).__name__ in fam.experts]


def shard_experts(
    model: torch.nn.Module,
    group: Any = None,
    *,
    backend: BackendChoice = "auto",
    average_grads: bool = False,
) -> PatchSet:
    """Keep this rank's slice of every experts stack and route through all-to-all.

    Every rank must hold the same full model (same seed or checkpoint) when this is called.

    Args:
        model: a model of a family with ``experts`` in the patch table.
        group: the expert-parallel group (default: the world).
        backend: the expert kernels (:func:`turbotune.moe.resolve_backend`).
        average_grads: divide the expert-shard gradients by the group size, matching the
            mean over ranks that DDP/FSDP2 apply to the replicated parameters (a shard's gradient
            is already the sum over every rank's tokens).

    Returns:
        the :class:`PatchSet` of the replaced forwards (``undo()`` restores the forwards; the
        stacks stay sharded until :func:`gather_experts`).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    patches = PatchSet(family_of(model)[0])
    for module in experts_modules(model):
        num_experts = module.gate_up_proj.shape[0]
        if num_experts % world:
            raise ValueError(f"{num_experts} experts do not split over {world} ranks")
        local = num_experts // world
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(module, name)
            shard = full.detach()[rank * local : (rank + 1) * local].clone()
            param = torch.nn.Parameter(shard, requires_grad=full.requires_grad)
            if average_grads and param.requires_grad:
                param.register_hook(lambda g, w=world: g / w)
            setattr(module, name, param)
        module._turbotune_ep = {"num_experts": num_experts, "group": group}
        patches.bind(module, "moe_ep", _ep_forward(backend))
    return patches


def expert_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The expert shards :func:`shard_experts` left on this rank: what FSDP2 must not shard or
    reduce (``fully_shard(..., ignored_params=...)``) when it wraps the rest of the model."""
    return {
        module._parameters[name]
        for module in experts_modules(model)
        if hasattr(module, "_turbotune_ep")
        for name in ("gate_up_proj", "down_proj")
        if module._parameters.get(name) is not None  # NF4 stacks: buffers, FSDP2 leaves them
    }


def gather_experts(model: torch.nn.Module, group: Any = None) -> None:
    """Rebuild the full expert stacks on every rank (``all_gather``), e.g. before
    ``save_pretrained`` on rank 0: the checkpoint then has the Hugging Face layout."""
    world = dist.get_world_size(group)
    for module in experts_modules(model):
        if not hasattr(module, "_turbotune_ep"):
            continue
        for name in ("gate_up_proj", "down_proj"):
            shard = _dense_shard(module, name)
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard, group=group)
            trains = module._parameters[name].requires_grad
            setattr(module, name, torch.nn.Parameter(torch.cat(parts, dim=0), requires_grad=trains))
        del module._turbotune_ep


def expert_stack_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """``(state-dict key, experts module, stack name)`` of every sharded stack of ``model``."""
    found = []
    for module_name, module in model.named_modules():
        if "_turbotune_ep" in module.__dict__:
            for name in ("gate_up_proj", "down_proj"):
                found.append((f"{module_name}.{name}", module, name))
    return found


def gathered_expert_state(
    model: torch.nn.Module, group: Any = None, dst: int = 0
) -> dict[str, torch.Tensor]:
    """The full expert stacks on rank ``dst``'s CPU, one stack in flight at a time (collective).

    Args:
        model: a model sharded by :func:`shard_experts`.
        group: the expert-parallel group of :func:`shard_experts`.
        dst: the rank (in ``group``) that receives the stacks.

    Returns:
        ``{state-dict key: [E, N, K] CPU tensor}`` on ``dst``; empty on the other ranks.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = {}
    for key, module, name in expert_stack_names(model):
        shard = _dense_shard(module, name)
        parts = [torch.empty_like(shard) for _ in range(world)] if rank == dst else None
        dist.gather(shard, parts, dst=dist.get_global_rank(group, dst) if group else dst,
                    group=group)  # fmt: skip
        if rank == dst:
            out[key] = torch.cat(parts, dim=0).cpu()
    return out


def _dense_shard(module: torch.nn.Module, name: str) -> torch.Tensor:
    stack = module._parameters.get(name)
    if stack is None:
        raise NotImplementedError(
            f"{type(module).__name__}.{name} is quantized: gathering NF4 expert shards back to "
            "the Hugging Face layout is not supported"
        )
    return stack.detach().contiguous()
