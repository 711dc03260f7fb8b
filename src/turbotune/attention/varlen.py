"""Variable-length causal attention over packed sequences: one function, several backends.

Design note. A padding-free batch is ``T`` tokens of ``n`` sequences back to back; attention
must stay inside each sequence. Four ways to compute it, chosen at run time:

* ``flash_attn`` — the flash-attn package's ``flash_attn_varlen_func`` (when installed; CUDA,
  fp16/bf16);
* ``varlen`` — PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; the
  flash kernels built into torch, so no extra package; CUDA, fp16/bf16). torch 2.10 takes
  ``is_causal``, later releases ``window_size``; grouped-query attention goes through
  ``enable_gqa`` where the signature has it, else k and v are repeated;
* ``flex`` — FlexAttention with a document mask (block-sparse: blocks across sequences are
  skipped), compiled on CUDA; any dtype (``auto`` takes it on CUDA only: eagerly it
  materializes the scores);
* ``sdpa_loop`` — the exact fallback: ``scaled_dot_product_attention`` on each sequence in turn
  (CPU, fp32, or whatever the others cannot take). Slow for many short sequences on a GPU, but
  exact and it never lets a token see another sequence.

``auto`` takes the first of them that can run the inputs. Every backend is checked against
:func:`turbotune.attention.reference.varlen_attention_reference` (tests/attention).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from typing import Literal

import torch
import torch.nn.functional as F

from turbotune.attention.reference import causal_window_mask

Backend = Literal["auto", "flash_attn", "varlen", "flex", "sdpa_loop"]
BACKENDS: tuple[str, ...] = ("auto", "flash_attn", "varlen", "flex", "sdpa_loop")

__all__ = ["BACKENDS", "Backend", "available_backends", "resolve_backend", "varlen_attention"]

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _torch_varlen():
    """``torch.nn.attention.varlen.varlen_attn`` and its keyword names, or ``None``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def available_backends() -> list[str]:
    """The backends this installation has (whether they run depends on device and dtype)."""
    names = ["flash_attn"] if _has_flash_attn() else []
    names += ["varlen"] if _torch_varlen() is not None else []
    names += ["flex"] if _has_flex() else []
    return [*names, "sdpa_loop"]


def _can_run(name: str, q: torch.Tensor, dropout: float, head_dim: int) -> bool:
    flash_like = q.is_cuda and q.dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0
    if name == "flash_attn":
        return _has_flash_attn() and flash_like
    if name == "varlen":
        return _torch_varlen() is not None and flash_like and dropout == 0.0
    if name == "flex":  # runs anywhere, but eagerly (outside CUDA) it materializes the scores
        return _has_flex() and dropout == 0.0
    return True


def resolve_backend(
    backend: str, q: torch.Tensor, *, dropout: float = 0.0, head_dim: int | None = None
) -> str:
    """The backend that will run ``q`` (``auto``: the first of :data:`BACKENDS` that can).

    Raises:
        ValueError: an unknown name, or a named backend that cannot run these inputs.
    """
    head_dim = q.shape[-1] if head_dim is None else head_dim
    if backend == "auto":
        for name in BACKENDS[1:]:
            if _can_run(name, q, dropout, head_dim) and (name != "flex" or q.is_cuda):
                return name
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose from {BACKENDS}")
    if not _can_run(backend, q, dropout, head_dim):
        raise ValueError(
            f"attention backend '{backend}' cannot run {q.dtype} on {q.device} "
            f"(head_dim {head_dim}, dropout {dropout}); available here: {available_backends()}"
        )
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    window: int | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of each packed sequence on its own.

    Args:
        q: ``(T, Hq, D)``.
        k: ``(T, Hk, D)``, ``Hq % Hk == 0``.
        v: ``(T, Hk, D)``.
        cu_seqlens: ``(n + 1,)`` int32 cumulative lengths on ``q``'s device.
        max_seqlen: the longest sequence (a python int: kernels size their grids with it).
        scale: score scale (``D ** -0.5`` when ``None``).
        window: sliding window (a token sees the ``window`` latest keys, itself included).
        dropout: attention-probability dropout (``flash_attn`` and ``sdpa_loop`` only).
        backend: one of :data:`BACKENDS`.

    Returns:
        ``(T, Hq, D)``, differentiable with respect to ``q``, ``k`` and ``v``.
    """
    name = resolve_backend(backend, q, dropout=dropout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if name == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale, window, dropout)
    if name == "varlen":
        return _torch_varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale, window)
    if name == "flex":
        from turbotune.attention.flex import flex_varlen_attention

        return flex_varlen_attention(q, k, v, cu_seqlens, scale=scale, window=window)
    return sdpa_loop(q, k, v, cu_seqlens, scale=scale, window=window, dropout=dropout)


def _window_size(window: int | None) -> tuple[int, int]:
    # flash convention: (left, right) keys around the query; causal means right = 0.
    return (-1, 0) if window is None else (window - 1, 0)


def _flash_attn(q, k, v, cu, max_len, scale, window, dropout):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
        causal=True, window_size=_window_size(window),
    )  # fmt: skip


def _torch_varlen_attn(q, k, v, cu, max_len, scale, window):
    varlen_attn, params = _torch_varlen()
    kwargs: dict = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:  # torch 2.10 has no scale: fold it into q (linear)
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kwargs["window_size"] = _window_size(window)
    elif window is not None:
        raise ValueError("this torch's varlen_attn has no sliding window; use backend 'flex'")
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # torch 2.10/2.11: one k/v head per query head
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def sdpa_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The exact fallback: ``scaled_dot_product_attention`` per sequence (shapes as
    :func:`varlen_attention`)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = None if window is None else causal_window_mask(end - start, window, q.device)
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)
