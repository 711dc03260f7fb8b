"""Rotary position embedding of queries and keys in one Triton launch, forward and backward.

One program handles one token ``(b, s)``: it loads that token's cos/sin row once and rotates
every query and key head of it as a ``[heads, D/2]`` block. Because cos/sin are indexed by
``(b, s)``, whatever positions produced them are honoured, including padding-free batches whose
positions restart at 0 inside a row. Inputs may be any strided view (HF transposes
``[B, S, H, D]`` to ``[B, H, S, D]``); outputs are new tensors, never written in place, so
autograd of the producers of ``q`` and ``k`` stays valid.

The rotation is HF's rotate-half convention, ``y = x * cos + rotate_half(x) * sin``. Written
per half with ``cos = [c1, c2]``, ``sin = [s1, s2]``: ``y1 = x1 c1 - x2 s1``,
``y2 = x2 c2 + x1 s2``. It is linear in ``x``; the backward applies the transposed map, which
for HF's tables (``c1 = c2``, ``s1 = s2``) is the rotation by ``-sin``.
"""

from __future__ import annotations

import torch

from turbotune.ops import reference
from turbotune.ops._triton import tl, triton, use_triton

__all__ = ["RotaryFunction", "apply_rotary", "rotary_backward", "rotary_forward", "rotate_into"]


@triton.jit
def _rotate_heads(
    x_ptr,
    y_ptr,
    stride_xh,
    stride_xd,
    stride_yh,
    stride_yd,
    c1,
    c2,
    s1,
    s2,
    n_heads,
    half_dim,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate the ``[n_heads, D]`` rows of one token (``x_ptr``/``y_ptr`` point at head 0).

    Forward: ``y1 = x1 c1 - x2 s1``, ``y2 = x2 c2 + x1 s2``.
    Backward (transpose): ``y1 = x1 c1 + x2 s2``, ``y2 = x2 c2 - x1 s1``.
    """
    heads = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :].to(tl.int64)
    mask = (heads < n_heads) & (cols < half_dim)
    x_first = x_ptr + heads * stride_xh + cols * stride_xd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half_dim * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_first = y_ptr + heads * stride_yh + cols * stride_yd
    tl.store(y_first, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_first + half_dim * stride_yd, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(
    x_ptr,
    y_ptr,
    stride_xh,
    stride_xd,
    stride_yh,
    stride_yd,
    n_heads,
    half_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy the ``[n_heads, D]`` rows of one token, one half of ``D`` at a time."""
    heads = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :].to(tl.int64)
    mask = (heads < n_heads) & (cols < half_dim)
    x_first = x_ptr + heads * stride_xh + cols * stride_xd
    y_first = y_ptr + heads * stride_yh + cols * stride_yd
    x1 = tl.load(x_first, mask=mask, other=0.0)
    x2 = tl.load(x_first + half_dim * stride_xd, mask=mask, other=0.0)
    tl.store(y_first, x1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_first + half_dim * stride_yd, x2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_out_ptr,
    v_out_ptr,
    cos_ptr,
    sin_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_qod,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_kod,
    stride_vob,
    stride_voh,
    stride_vos,
    stride_vod,
    stride_cb,
    stride_cs,
    stride_cd,
    seq_len,
    n_q_heads,
    n_k_heads,
    n_v_heads,
    half_dim,
    BACKWARD: tl.constexpr,
    HAS_V: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_VH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token: load its cos/sin halves, rotate all query heads then all key heads.

    ``BACKWARD`` selects the transposed rotation, mapping ``(dq_rot, dk_rot)`` to ``(dq, dk)``.
    ``HAS_V`` also copies the ``n_v_heads`` rows of ``v`` to ``v_out`` unchanged (the backward
    of :mod:`turbotune.ops.rope_qkv` puts ``dv`` beside ``dq`` and ``dk`` in one buffer).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    cols = tl.arange(0, BLOCK_D)[None, :].to(tl.int64)
    cmask = cols < half_dim
    row = b * stride_cb + s * stride_cs + cols * stride_cd
    c1 = tl.load(cos_ptr + row, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row + half_dim * stride_cd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row + half_dim * stride_cd, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + b * stride_qb + s * stride_qs, q_out_ptr + b * stride_qob + s * stride_qos,
        stride_qh, stride_qd, stride_qoh, stride_qod, c1, c2, s1, s2, n_q_heads, half_dim,
        BACKWARD, BLOCK_QH, BLOCK_D,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + b * stride_kb + s * stride_ks, k_out_ptr + b * stride_kob + s * stride_kos,
        stride_kh, stride_kd, stride_koh, stride_kod, c1, c2, s1, s2, n_k_heads, half_dim,
        BACKWARD, BLOCK_KH, BLOCK_D,
    )  # fmt: skip
    if HAS_V:
        _copy_heads(
            v_ptr + b * stride_vb + s * stride_vs, v_out_ptr + b * stride_vob + s * stride_vos,
            stride_vh, stride_vd, stride_voh, stride_vod, n_v_heads, half_dim, BLOCK_VH, BLOCK_D,
        )  # fmt: skip


def _launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # empty_like keeps the strides of a dense view: q as HF transposes it ([B, S, H, D] in
    # memory) gives a q_rot laid out the same way, which is what SDPA's kernels read best.
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    rotate_into(q, k, cos, sin, q_out, k_out, backward=backward)
    return q_out, k_out


def rotate_into(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    *,
    backward: bool,
    v: torch.Tensor | None = None,
    v_out: torch.Tensor | None = None,
) -> None:
    """One launch: rotate ``q`` and ``k`` into ``q_out`` and ``k_out`` (and copy ``v`` into
    ``v_out``), every tensor any strided view (no autograd).

    Args:
        q: ``[B, Hq, S, D]``; k: ``[B, Hk, S, D]``; v: ``[B, Hv, S, D]`` or None.
        cos, sin: ``[B, S, D]`` or ``[1, S, D]``.
        q_out, k_out, v_out: written, with the shapes of ``q``, ``k`` and ``v``.
        backward: apply the transposed rotation (gradients of the forward).
    """
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    if head_dim % 2 or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, S and an even D")
    if v is not None and (v.shape[0] != batch or v.shape[2:] != q.shape[2:]):
        raise ValueError(f"v {tuple(v.shape)} must share B, S and D with q {tuple(q.shape)}")
    if q.numel() == 0:
        return
    cos, sin = cos.expand(batch, seq_len, head_dim), sin.expand(batch, seq_len, head_dim)
    if cos.stride() != sin.stride():  # the kernel indexes both tables with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    has_v = v is not None
    n_v_heads = v.shape[1] if has_v else 0
    v_strides = v.stride() if has_v else (0, 0, 0, 0)
    v_out_strides = v_out.stride() if has_v else (0, 0, 0, 0)
    half = head_dim // 2
    _rotary_kernel[(batch * seq_len,)](
        q, k, v if has_v else q, q_out, k_out, v_out if has_v else q_out, cos, sin,
        *q.stride(), *k.stride(), *v_strides, *q_out.stride(), *k_out.stride(), *v_out_strides,
        *cos.stride(), seq_len, n_q_heads, n_k_heads, n_v_heads, half,
        BACKWARD=backward,
        HAS_V=has_v,
        BLOCK_QH=triton.next_power_of_2(n_q_heads),
        BLOCK_KH=triton.next_power_of_2(n_k_heads),
        BLOCK_VH=triton.next_power_of_2(max(n_v_heads, 1)),
        BLOCK_D=triton.next_power_of_2(half),
    )  # fmt: skip


def rotary_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward rotation (no autograd).

    Args:
        q: ``[B, Hq, S, D]``, any strides.
        k: ``[B, Hk, S, D]``, any strides.
        cos: ``[B, S, D]`` or ``[1, S, D]``.
        sin: same shape as ``cos``.

    Returns:
        ``(q_rot, k_rot)`` with the shapes and dtypes of ``q`` and ``k``.
    """
    return _launch(q, k, cos, sin, backward=False)


def rotary_backward(
    dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`rotary_forward` with respect to ``q`` and ``k`` (no autograd)."""
    return _launch(dq_rot, dk_rot, cos, sin, backward=True)


class RotaryFunction(torch.autograd.Function):
    """Autograd glue for the rotary kernels; cos/sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return rotary_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot: torch.Tensor, dk_rot: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = rotary_backward(dq_rot, dk_rot, cos, sin)
        return dq, dk, None, None


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``).

    Runs the Triton kernel when :func:`~turbotune.ops._triton.use_triton` allows, else the
    eager :func:`turbotune.ops.reference.apply_rotary`. Computes in fp32 and rounds once at the
    store (HF rounds after each multiply and add in the input dtype).

    Args:
        q: queries ``[B, Hq, S, D]``, any strides.
        k: keys ``[B, Hk, S, D]``, any strides.
        cos: ``[B, S, D]`` (or ``[1, S, D]``) from the model's rotary embedding module, or
            :func:`turbotune.ops.reference.rotary_cos_sin`.
        sin: same shape as ``cos``.

    Returns:
        ``(q_rot, k_rot)``, differentiable with respect to ``q`` and ``k``.
    """
    if use_triton(q, k, cos, sin):
        return RotaryFunction.apply(q, k, cos, sin)
    return reference.apply_rotary(q, k, cos, sin)
