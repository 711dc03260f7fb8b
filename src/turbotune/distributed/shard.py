"""FSDP2 in one function: :func:`apply_fsdp` shards a (LoRA-augmented, patched) model in place.

Design note (after torchtitan's ``apply_fsdp``). Each decoder block is one ``fully_shard``
group, the root is the last (embeddings, final norm, LM head). The parameters of a group are
gathered right before its forward and again before its backward; the gradients of its
trainable ones are reduce-scattered after its backward. What FSDP2 demands, and how it is met:

* **Uniform dtype of the trainable parameters of a group** (FSDP2 asserts it). LoRA weights all
  have one dtype (``adapter.weights_dtype``); frozen parameters may differ (FSDP2 gathers mixed
  dtypes as bytes).
* **Mixed precision** follows :mod:`turbotune.precision`: modes without autocast gather the
  stored dtype (``param_dtype=None``); autocast modes gather in the autocast dtype and reduce
  gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), and the
  forward also runs under ``torch.autocast`` (:class:`~turbotune.distributed.trainer.ShardedModel`)
  so the numbers are those of a one-process run. The policy casts *every* parameter of a group,
  frozen ones too: 4-bit storage (:class:`~turbotune.distributed.nf4.NF4Linear`) is therefore
  kept in exactly ``param_dtype``, which makes the cast a no-op; :func:`check_storage` refuses
  a mismatch instead of silently converting packed bytes. GPTQ storage is packed the same way
  (:func:`turbotune.distributed.gptq.make_gptq_shardable`, called here).
* **Dim-0 sharding with padding**: any parameter shape works (4-bit storage is 1-D bytes).
* **Activation checkpointing / offload** wrap each block's forward before it is sharded
  (:mod:`turbotune.distributed.activations`).

What FSDP2 costs per step, and the options that cut it. Per group and step FSDP2 runs four
hooks (pre/post forward, pre/post backward) whose Python work grows with the group's parameter
count (copy-in/copy-out views, gradient bookkeeping), and the optimizer and gradient clipping
then run on DTensors (DTensor dispatch per foreach op). A QLoRA block has 23 parameters (7 packed
4-bit weights, 2 norms, 14 LoRA A/B). When the host is the bottleneck (the fused 8B step on one
H100 is: ~230 ms of host work per step), that work adds to the step, and an all-gather issued
by a pre-forward hook does not overlap compute. Hence:

* ``frozen: replicate`` keeps every frozen parameter whole on every process and out of FSDP2
  (``ignored_params``): no all-gather of the base ever, FSDP2 manages the adapters only. The
  base's memory is paid on every GPU, which a base that fits one GPU affords.
* ``groups: model``: one FSDP2 group (the root) instead of one per block: one all-gather before
  the forward, one reduce-scatter after the backward, four hook calls per step.
* ``prefetch: N``: explicit forward/backward prefetch, N blocks ahead (:func:`set_prefetch`).
* ``ignored_params`` (argument): parameters another mechanism owns (expert-parallel experts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbotune.errors import ConfigError

if TYPE_CHECKING:
    from turbotune.distributed.config import DistributedConfig
    from turbotune.precision import PrecisionPlan

__all__ = [
    "apply_fsdp",
    "check_storage",
    "decoder_blocks",
    "is_sharded",
    "mixed_precision_policy",
    "set_prefetch",
]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a causal LM (``model.layers`` of Llama-likes), as
    :func:`turbotune.blocks.decoder_layers` finds them.

    Raises:
        ConfigError: the model has no list of blocks.
    """
    from turbotune.blocks import decoder_layers

    blocks = decoder_layers(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no list of decoder blocks to shard")
    return blocks


def mixed_precision_policy(plan: PrecisionPlan):
    """The FSDP2 ``MixedPrecisionPolicy`` of a precision plan (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if plan.autocast is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=plan.autocast, reduce_dtype=torch.float32)


def storage_dtype_for(plan: PrecisionPlan, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit storage must have so that the FSDP2 cast leaves its bytes alone."""
    return plan.autocast or compute_dtype


def check_storage(
    model: nn.Module, param_dtype: torch.dtype | None, ignored: set[nn.Parameter] = frozenset()
) -> None:
    """Refuse 4-bit storage whose dtype the mixed-precision policy would convert (parameters in
    ``ignored`` are outside FSDP2 and never cast)."""
    from turbotune.distributed.nf4 import NF4Linear

    if param_dtype is not None:  # the policy would convert integer storage of any format
        for name, param in model.named_parameters():
            if not param.dtype.is_floating_point and param not in ignored:
                raise ConfigError(
                    f"{name}: {param.dtype} storage would be converted to {param_dtype} by FSDP2's "
                    "mixed precision; store packed weights in the gather dtype"
                )
    for name, module in model.named_modules():
        if not isinstance(module, NF4Linear) or module.packed in ignored:
            continue
        if param_dtype not in (None, module.packed.dtype):
            raise ConfigError(
                f"{name}: 4-bit storage is {module.packed.dtype} but FSDP2 gathers in {param_dtype}; "
                "the storage dtype must equal the gather dtype (quantize with storage_dtype_for)"
            )


def _pack_gptq(model: nn.Module, param_dtype: torch.dtype | None, ignored: set) -> None:
    """GPTQ storage as one byte-packed parameter per layer, so FSDP2 shards it
    (:mod:`turbotune.distributed.gptq`); gathered in ``param_dtype``, without one in the
    trainable parameters' dtype (any dtype would do: the stored one is gathered as is)."""
    from turbotune.distributed.gptq import make_gptq_shardable

    dtypes = _trainable_dtypes(model, ignored)
    default = next(iter(dtypes)) if len(dtypes) == 1 else torch.bfloat16
    make_gptq_shardable(model, param_dtype or default)


def _trainable_dtypes(module: nn.Module, ignored: set[nn.Parameter]) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.requires_grad and p not in ignored}


def _ignored_kwargs(ignored_params: set[nn.Parameter] | None) -> dict[str, Any]:
    """``fully_shard``'s ``ignored_params`` argument, refused clearly where torch lacks it."""
    if not ignored_params:
        return {}
    import inspect

    from torch.distributed.fsdp import fully_shard

    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ConfigError(
            f"torch {torch.__version__}: fully_shard has no 'ignored_params' (added in torch "
            "2.7); parameters kept out of FSDP2 (distributed.frozen=replicate, expert "
            "parallelism) need a newer torch"
        )
    return {"ignored_params": set(ignored_params)}


def apply_fsdp(
    model: nn.Module,
    config: DistributedConfig,
    plan: PrecisionPlan,
    mesh: Any,
    *,
    blocks: list[nn.Module] | None = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder block, then the root.

    Args:
        model: the model as the Trainer will see it (a ``PeftModel`` or a ``PreTrainedModel``),
            adapters attached and patches applied; on any device, or on ``meta`` (low-memory
            loading materializes it afterwards).
        config: the ``distributed`` section.
        plan: the run's precision plan.
        mesh: from :func:`turbotune.distributed.env.build_mesh`.
        blocks: the modules to shard one by one (default :func:`decoder_blocks`).
        ignored_params: parameters FSDP2 must leave alone (neither sharded, gathered nor
            reduced), e.g. expert-parallel expert weights that another process group owns;
            passed to every ``fully_shard`` call.

    Returns:
        The same model object, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from turbotune.distributed.activations import wrap_block

    blocks = decoder_blocks(model) if blocks is None else blocks
    mp = mixed_precision_policy(plan)
    ignored = set(ignored_params or ())
    _pack_gptq(model, mp.param_dtype, ignored)
    check_storage(model, mp.param_dtype, ignored)
    dtypes = _trainable_dtypes(model, ignored)
    if len(dtypes) > 1:
        raise ConfigError(
            f"FSDP2 needs one dtype for all trainable parameters, found {sorted(map(str, dtypes))}; "
            "set adapter.weights_dtype so that every adapter weight has the same dtype"
        )
    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if config.cpu_offload
        else OffloadPolicy()
    )
    if config.frozen == "replicate":  # whole on every process: FSDP2 never touches them
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, **_ignored_kwargs(ignored))
    for block in blocks:
        wrap_block(
            block, checkpoint=config.activation_checkpointing, offload=config.activation_offload
        )
    groups = blocks if config.groups == "block" else []
    for i, block in enumerate(groups):
        # The last block's parameters are needed again right away by backward: keep them.
        reshard = config.reshard_after_forward and i < len(groups) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=config.reshard_after_forward, **kwargs)
    set_prefetch(model, groups, config.prefetch)
    model.__dict__["_turbotune_fsdp"] = {"mesh": mesh, "plan": plan, "config": config}
    return model


def set_prefetch(root: nn.Module, blocks: list[nn.Module], depth: int) -> None:
    """Issue each block's all-gather ``depth`` blocks ahead, in forward and in backward.

    FSDP2 issues a group's all-gather when its pre-forward hook runs; when the host is not
    ahead of the GPU (a host-bound step), that is when the GPU needs the weights, and the
    gather does not overlap compute. Explicit prefetch issues it while an earlier block runs.
    The root (embeddings, head) prefetches the first blocks in forward.
    """
    if depth < 1 or not blocks:
        return
    root.set_modules_to_forward_prefetch(blocks[:depth])
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - depth) : i][::-1])


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`apply_fsdp` sharded ``model``."""
    return "_turbotune_fsdp" in model.__dict__
