"""Activation checkpointing and activation offloading, one decoder block at a time.

Design note. Both wrap a block's ``forward`` *on the instance* (as the patch engine does), so
the module tree and every parameter name stay what they were: PEFT adapter keys and DCP
checkpoint keys do not change, unlike with ``checkpoint_wrapper``. FSDP2's hooks live in
``__call__``, outside ``forward``, so the recomputation runs inside the block's FSDP unshard —
the composition torchtitan uses (checkpoint inside ``fully_shard``).

* checkpointing: ``torch.utils.checkpoint`` (non-reentrant): a block keeps only its inputs.
* offload without checkpointing: saved-tensor hooks move every activation a block saves for
  backward (not parameters, not small tensors) to pinned CPU memory, and back on use.
* offload *with* checkpointing: what remains per block is its input hidden state, which the
  non-reentrant checkpoint holds itself (no saved-tensor hook sees it).
  :func:`turbotune.distributed.offload.offloaded_checkpoint` is a checkpoint that keeps that
  input in pinned host memory, copied on side streams and prefetched in backward (its design
  note).

:func:`checkpoint_layers` applies the same wrapping to every decoder layer of a model on one
device (``train.activation_offload``), in place of transformers' own checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn

from turbotune.blocks import checkpointing_layers
from turbotune.distributed.offload import ActivationOffloader, offloaded_checkpoint

__all__ = ["checkpoint_layers", "decoder_layers", "offload_saved_tensors", "wrap_block"]

_MIN_OFFLOAD_BYTES = 1 << 16  # smaller tensors are not worth a copy each way


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=t.is_cuda)
    return host


@contextlib.contextmanager
def offload_saved_tensors():
    """Saved-tensor hooks that keep large activations on the CPU until backward needs them."""

    def pack(t: torch.Tensor) -> Any:
        if t.device.type == "cpu" or isinstance(t, nn.Parameter):
            return t
        if t.numel() * t.element_size() < _MIN_OFFLOAD_BYTES:
            return t
        return (t.device, _to_host(t))

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=True)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _drop_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Training forwards of a recomputed block run without a KV cache: the recomputation would
    append its keys/values a second time and attend over both copies (transformers turns the
    cache off under its own gradient checkpointing for the same reason)."""
    if kwargs.get("past_key_values") is not None:
        kwargs["past_key_values"] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def wrap_block(
    block: nn.Module,
    *,
    checkpoint: bool,
    offload: bool,
    offloader: ActivationOffloader | None = None,
) -> None:
    """Make ``block.forward`` checkpointed and/or offloaded (in place; names unchanged).

    Args:
        block: a decoder layer, called as ``block(hidden_states, **kwargs)``.
        checkpoint: recompute the block in backward.
        offload: keep what the block saves for backward on the CPU.
        offloader: pool and streams of the offloaded checkpoint (default: the process's own).
    """
    if not (checkpoint or offload):
        return
    inner = block.forward

    if checkpoint and offload:

        @functools.wraps(inner)
        def forward(hidden_states, *args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(hidden_states, *args, **kwargs)
            kw = _drop_cache(kwargs)
            outs = offloaded_checkpoint(lambda h: inner(h, *args, **kw), hidden_states, offloader)
            return outs if len(outs) > 1 else outs[0]

    elif checkpoint:
        from torch.utils.checkpoint import checkpoint as torch_checkpoint

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            return torch_checkpoint(inner, *args, use_reentrant=False, **_drop_cache(kwargs))

    else:

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            with offload_saved_tensors():
                return inner(*args, **kwargs)

    block.forward = forward
    block.__dict__["_turbotune_block_wrapped"] = (checkpoint, offload)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``GradientCheckpointingLayer`` modules of ``model``: the
    blocks transformers itself would checkpoint (decoder layers, in call order)."""
    return checkpointing_layers(model)


def checkpoint_layers(
    model: nn.Module,
    *,
    offload: bool,
    offloader: ActivationOffloader | None = None,
    offload_layers: int | None = None,
) -> int:
    """Checkpoint every decoder layer of ``model`` with turbotune's wrapper (in place).

    Replaces transformers' ``gradient_checkpointing_enable``, which must stay off: a layer
    checkpointed by both would be recomputed twice. Already wrapped layers are left alone.

    Args:
        model: a transformers model, or a peft model around one.
        offload: keep each layer's input in host memory (:mod:`turbotune.distributed.offload`).
        offloader: pool and streams to use (default: the process's own).
        offload_layers: with ``offload``, offload only the first this many layers' inputs
            (None: all); the others are checkpointed on the GPU.

    Returns:
        The number of layers wrapped.

    Raises:
        ValueError: the model has no ``GradientCheckpointingLayer``.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformers GradientCheckpointingLayer to checkpoint"
        )
    wrapped = 0
    for i, layer in enumerate(layers):
        if "_turbotune_block_wrapped" in layer.__dict__:
            continue
        if getattr(layer, "gradient_checkpointing", False):
            raise ValueError(
                "transformers' gradient checkpointing is on: turn it off (activation offload "
                "checkpoints the layers itself)"
            )
        host = offload and (offload_layers is None or i < offload_layers)
        wrap_block(layer, checkpoint=True, offload=host, offloader=offloader)
        wrapped += 1
    return wrapped
