"""``turbotune_varlen``: packed-sequence attention registered with transformers' AttentionInterface.

Design note. transformers models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with ``(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` where the
kwargs carry everything the model's ``forward`` received — for padding-free batches the
collator's ``cu_seq_lens_q/k`` and ``max_length_q/k``, and the decoder layer's ``position_ids``.
:func:`varlen_attention_forward` takes the sequence boundaries from them (from
``position_ids`` restarting at 0 when the kwargs are absent, else every row is one sequence)
and calls :func:`turbotune.attention.varlen_attention`, which picks flash-attn, PyTorch's
varlen kernel, FlexAttention or the exact per-sequence fallback.

The mask. transformers builds the attention mask through ``AttentionMaskInterface`` under the
same name. Training batches without padding need none (a packed row would otherwise get a
``T x T`` block-diagonal mask), so :func:`varlen_mask` returns ``None`` when there is no padding
mask and no KV cache; anything else (padded evaluation, generation) gets the SDPA mask and the
SDPA attention, exactly as ``attn_implementation="sdpa"`` would compute it.
"""

from __future__ import annotations

from typing import Any

import torch

from turbotune.attention.varlen import BACKENDS, varlen_attention

IMPLEMENTATION = "turbotune_varlen"
"""The name under which the attention and its mask are registered."""

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""transformers' own implementations that already read ``cu_seq_lens_*``: kept as they are."""

_state = {"backend": "auto", "registered": False}

__all__ = [
    "IMPLEMENTATION",
    "register_varlen_attention",
    "set_varlen_backend",
    "use_varlen_attention",
    "varlen_attention_forward",
    "varlen_from_kwargs",
    "varlen_mask",
]


def set_varlen_backend(backend: str) -> None:
    """The backend :func:`varlen_attention_forward` uses (one of ``BACKENDS``; ``auto`` default)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose from {BACKENDS}")
    _state["backend"] = backend


def varlen_from_kwargs(
    kwargs: dict[str, Any], batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (n + 1,), max_seqlen)`` over the ``batch * seq`` flattened tokens.

    From ``cu_seq_lens_q`` + ``max_length_q`` when the batch carries them; else from
    ``position_ids`` (a new sequence wherever the position does not follow the previous one,
    transformers' packed-sequence rule); else each row is one sequence.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and kwargs.get("max_length_q") is not None:
        return cu.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    total = batch * seq
    pos = kwargs.get("position_ids")
    if pos is None or pos.numel() != total:
        cu = torch.arange(0, total + 1, seq, dtype=torch.int32, device=device)
        return cu, seq
    pos = pos.reshape(batch, seq).to(device)
    new = torch.ones_like(pos, dtype=torch.bool)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = new.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function (transformers' layout).

    Args:
        module: the attention module (``is_causal`` is honoured: a non-causal one takes SDPA).
        query: ``(B, Hq, S, D)``.
        key: ``(B, Hk, S, D)``.
        value: ``(B, Hk, S, D)``.
        attention_mask: ``None`` for padding-free/unpadded batches; a 4-D mask otherwise.
        dropout: attention dropout probability.
        scaling: score scale.
        sliding_window: the layer's sliding window, if any.
        **kwargs: ``cu_seq_lens_q``, ``max_length_q``, ``position_ids``, ... (see
            :func:`varlen_from_kwargs`).

    Returns:
        ``((B, S, Hq, D), None)``.
    """
    batch, heads, seq, _dim = query.shape
    causal = getattr(module, "is_causal", True)
    if attention_mask is not None or key.shape[2] != seq or not causal:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, max_len = varlen_from_kwargs(kwargs, batch, seq, query.device)
    q, k, v = (
        t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[-1]) for t in (query, key, value)
    )
    out = varlen_attention(
        q, k, v, cu, max_len, scale=scaling, window=sliding_window, dropout=dropout,
        backend=_state["backend"],
    )  # fmt: skip
    return out.reshape(batch, seq, heads, value.shape[-1]), None


def varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The AttentionMaskInterface function: ``None`` without padding and cache (the boundaries
    travel in the kwargs), else transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # older signature
        q_length = kwargs["cache_position"].shape[0]
    no_cache = (
        q_length is not None
        and q_length == kwargs.get("kv_length")
        and not kwargs.get("kv_offset")
        and not kwargs.get("q_offset")
    )
    if not args and kwargs.get("attention_mask") is None and no_cache:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> str:
    """Register the attention and its mask under :data:`IMPLEMENTATION` (idempotent)."""
    if not _state["registered"]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, varlen_mask)
        _state["registered"] = True
    return IMPLEMENTATION


def use_varlen_attention(model: torch.nn.Module, backend: str = "auto") -> str:
    """Switch ``model`` (a transformers model, possibly peft-wrapped) to packed-sequence
    attention; a model on flash-attention keeps it (it already reads ``cu_seq_lens_*``).

    Returns:
        The attention implementation the model now uses.
    """
    set_varlen_backend(backend)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    if current in FLASH_IMPLEMENTATIONS:
        return current
    name = register_varlen_attention()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:
        base.config._attn_implementation = name
    return name
