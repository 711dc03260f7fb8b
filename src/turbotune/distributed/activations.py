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
  non-reentrant checkpoint holds itself (no saved-tensor hook sees it). :class:`_OffloadedCheckpoint`
  is a checkpoint that stores that input on the CPU: forward runs without grad and copies the
  input to the host; backward copies it back, recomputes with grad and back-propagates through
  the recomputation (the reentrant scheme of ``torch.utils.checkpoint``, with the RNG state
  restored so dropout masks repeat).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["offload_saved_tensors", "wrap_block"]

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


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint of ``run(hidden)`` whose saved input lives on the CPU.

    ``anchor`` is an empty tensor that requires grad, so the output requires grad even when
    ``hidden`` does not (frozen embeddings), as the reentrant checkpoint needs.
    """

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], hidden: torch.Tensor, anchor):
        ctx.run = run
        ctx.device = hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.host = _to_host(hidden.detach())
        with torch.no_grad():
            out = run(hidden)
        ctx.tuple_out = isinstance(out, tuple)
        return out if ctx.tuple_out else (out,)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(ctx.hidden_requires_grad)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, hidden.grad if ctx.hidden_requires_grad else None, None


def _apply_offloaded_checkpoint(run, hidden: torch.Tensor):
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    outs = _OffloadedCheckpoint.apply(run, hidden, anchor)
    return outs


def _drop_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Training forwards of a recomputed block run without a KV cache: the recomputation would
    append its keys/values a second time and attend over both copies (transformers turns the
    cache off under its own gradient checkpointing for the same reason)."""
    if kwargs.get("past_key_values") is not None:
        kwargs["past_key_values"] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def wrap_block(block: nn.Module, *, checkpoint: bool, offload: bool) -> None:
    """Make ``block.forward`` checkpointed and/or offloaded (in place; names unchanged).

    Args:
        block: a decoder layer, called as ``block(hidden_states, **kwargs)``.
        checkpoint: recompute the block in backward.
        offload: keep what the block saves for backward on the CPU.
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
            outs = _apply_offloaded_checkpoint(lambda h: inner(h, *args, **kw), hidden_states)
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
