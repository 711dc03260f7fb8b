"""Packed-sequence attention through FlexAttention with a document mask.

Design note (after PyTorch's FlexAttention "document masking" recipe). Each token gets the index
of its sequence; the mask allows ``q -> kv`` when both are in the same sequence and
``kv <= q`` (and within the sliding window, if any). ``create_block_mask`` turns that into a
block-sparse map, so blocks that lie across two sequences are never computed. On CUDA the
kernel is ``torch.compile``-d once (dynamic shapes: every batch has a different ``T``); on CPU
it runs eagerly (slow, for tests).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["document_ids", "flex_varlen_attention"]


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``(T,)`` int32: the sequence each packed token belongs to."""
    starts = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    inner = cu_seqlens[1:-1].long()
    starts[inner[inner < total]] = 1  # a zero-length sequence would repeat a boundary
    return starts.cumsum(0, dtype=torch.int32)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal document-masked attention (shapes as :func:`turbotune.attention.varlen_attention`:
    ``q`` ``(T, Hq, D)``, ``k``/``v`` ``(T, Hk, D)``; returns ``(T, Hq, D)``)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    doc = document_ids(cu_seqlens, total)
    # Position inside the sequence is not needed: kv <= q within one document is causal.

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            allowed = allowed & (kv_idx > q_idx - window)
        return allowed

    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
