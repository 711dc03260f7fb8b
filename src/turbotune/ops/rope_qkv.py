"""Rotary embedding of q and k that also hands v through, so q, k, v get ONE gradient buffer.

Design note. The fused attention takes q, k and v from one LoRA group (``ops/lora.py``), whose
backward wants ``dy = [dq | dk | dv]`` (``[M, (Hq + 2 Hk) D]``) for its one input-gradient
matmul. With three separate gradients that is a ``torch.cat``: at Llama-8B shape and 4096
tokens a read and write of ``[4096, 6144]`` per layer (~34 us on an H100). Here the rotary
backward writes ``dq`` and ``dk`` straight into the column blocks of one such buffer and, in the
same launch, copies ``dv`` into the third block; ``v`` rides through this function as the
identity for that purpose (returning an input is allowed: autograd hands out a view of it, as
``ops/add_norm.py``'s ``RMSNormWithResidualFunction`` does). Autograd's transpose and view
backwards turn those blocks into adjacent ``[M, out_i]`` column views of the buffer, which
``lora_group.adjacent_columns`` recognises, so the group uses the buffer as its ``dy``.

Layouts are those of :mod:`turbotune.ops.rope`: ``q_rot``/``k_rot`` are ``empty_like`` of the
(transposed, ``[B, S, H, D]``-in-memory) inputs, so SDPA sees what it saw before, and the buffer
is ``[B, S, Hq + 2 Hk, D]`` in memory: the gradients come back in the very stride order of the
inputs. Anything in between (qk-norms, a consumer that sums two gradients) only makes the views
non-adjacent; the group then concatenates as before.

``ENABLED = False`` keeps :func:`turbotune.ops.rope.apply_rotary` and separate gradients (A/B).
"""

from __future__ import annotations

import torch

from turbotune.ops import reference
from turbotune.ops._triton import use_triton
from turbotune.ops.rope import rotary_backward, rotary_forward, rotate_into

__all__ = ["ENABLED", "RotaryQKVFunction", "apply_rotary_qkv", "rotary_qkv_backward"]

# Off: the fused attention calls the two-tensor rotary and q, k, v get separate gradients.
ENABLED = True


def rotary_qkv_backward(
    dq_rot: torch.Tensor,
    dk_rot: torch.Tensor,
    dv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` as head blocks of one ``[B, S, Hq + Hk + Hv, D]`` buffer (no autograd).

    Args:
        dq_rot: ``[B, Hq, S, D]``; dk_rot: ``[B, Hk, S, D]``; dv: ``[B, Hv, S, D]`` (any
            strides, one dtype).
        cos, sin: the forward's tables.

    Returns:
        ``[B, H_i, S, D]`` views of the buffer (strides ``(S W, D, W, 1)``, ``W`` the buffer's
        row of ``(Hq + Hk + Hv) D`` elements).
    """
    batch, n_q, seq, dim = dq_rot.shape
    n_k, n_v = dk_rot.shape[1], dv.shape[1]
    buf = torch.empty((batch, seq, n_q + n_k + n_v, dim), dtype=dq_rot.dtype, device=dq_rot.device)
    dq = buf.narrow(2, 0, n_q).transpose(1, 2)
    dk = buf.narrow(2, n_q, n_k).transpose(1, 2)
    dv_out = buf.narrow(2, n_q + n_k, n_v).transpose(1, 2)
    rotate_into(dq_rot, dk_rot, cos, sin, dq, dk, backward=True, v=dv, v_out=dv_out)
    return dq, dk, dv_out


class RotaryQKVFunction(torch.autograd.Function):
    """``(rope(q), rope(k), v)``; the backward writes ``dq``, ``dk``, ``dv`` into one buffer."""

    @staticmethod
    def forward(ctx, q, k, v, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        q_rot, k_rot = rotary_forward(q, k, cos, sin)
        return q_rot, k_rot, v

    @staticmethod
    def backward(ctx, dq_rot: torch.Tensor, dk_rot: torch.Tensor, dv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if not dq_rot.dtype == dk_rot.dtype == dv.dtype:  # no one buffer for mixed dtypes
            dq, dk = rotary_backward(dq_rot, dk_rot, cos, sin)
            return dq, dk, dv, None, None
        dq, dk, dv = rotary_qkv_backward(dq_rot, dk_rot, dv, cos, sin)
        return dq, dk, dv, None, None


def apply_rotary_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_rot, k_rot, v)`` as :func:`turbotune.ops.rope.apply_rotary` computes the first two.

    Runs the Triton kernels when :func:`~turbotune.ops._triton.use_triton` allows, else the
    eager reference (``v`` returned as is).

    Args:
        q: ``[B, Hq, S, D]``; k: ``[B, Hk, S, D]``; v: ``[B, Hv, S, D]`` (any strides).
        cos, sin: ``[B, S, D]`` or ``[1, S, D]``.

    Returns:
        ``(q_rot, k_rot, v)``, differentiable in ``q``, ``k`` and ``v``.
    """
    if use_triton(q, k, v, cos, sin):
        return RotaryQKVFunction.apply(q, k, v, cos, sin)
    q_rot, k_rot = reference.apply_rotary(q, k, cos, sin)
    return q_rot, k_rot, v
