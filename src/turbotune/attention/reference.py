"""The eager definition of variable-length causal attention, for tests and as the exact fallback.

Packed layout: ``T`` tokens of ``n`` sequences back to back, sequence ``i`` spanning
``cu_seqlens[i]:cu_seqlens[i + 1]``. Token ``t`` of a sequence attends to tokens ``s <= t`` of
the SAME sequence (and, with a sliding window ``w``, only to ``s > t - w``, transformers'
convention); never to another sequence. Computed in fp32 (or, for error budgets, in the input
dtype), output in the input dtype.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["causal_window_mask", "varlen_attention_reference"]


def causal_window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``(L, L)`` bool: ``True`` where query ``t`` may attend key ``s`` (``s <= t``, and
    ``s > t - window`` with a window)."""
    t = torch.arange(length, device=device)
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    return allowed


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Causal attention of each packed sequence on its own, by explicit matmuls.

    Args:
        q: ``(T, Hq, D)``.
        k: ``(T, Hk, D)`` with ``Hq % Hk == 0`` (grouped-query attention repeats k and v).
        v: ``(T, Hk, Dv)``.
        cu_seqlens: ``(n + 1,)`` cumulative lengths, ``cu_seqlens[-1] == T``.
        scale: score scale; ``D ** -0.5`` when ``None``.
        window: sliding window (keys ``s > t - window``), or ``None``.
        upcast: compute in fp32 (the reference); ``False`` keeps the input dtype throughout
            (the "eager low-precision run" that fused kernels' errors are compared with).

    Returns:
        ``(T, Hq, Dv)`` in ``q``'s dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    out = torch.empty((*q.shape[:2], v.shape[-1]), dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        dtype = torch.float32 if upcast else q.dtype
        qs = q[start:end].transpose(0, 1).to(dtype)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).to(dtype).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).to(dtype).repeat_interleave(groups, dim=0)
        scores = (qs @ ks.transpose(-1, -2)) * scale
        allowed = causal_window_mask(end - start, window, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out
