"""Attention over padding-free (packed) batches: each sequence attends only to itself.

- :mod:`.varlen`: :func:`varlen_attention` and its backends (flash-attn, PyTorch varlen,
  FlexAttention, the exact per-sequence fallback).
- :mod:`.flex`: the FlexAttention document-mask backend.
- :mod:`.reference`: the eager definition the backends are tested against.
- :mod:`.interface`: the ``turbotune_varlen`` implementation registered with transformers'
  ``AttentionInterface`` and :func:`use_varlen_attention` to switch a model to it.

Importing this package imports neither transformers nor any kernel package.
"""

from __future__ import annotations

from turbotune.attention.interface import (
    IMPLEMENTATION,
    register_varlen_attention,
    set_varlen_backend,
    use_varlen_attention,
    varlen_attention_forward,
)
from turbotune.attention.reference import varlen_attention_reference
from turbotune.attention.varlen import BACKENDS, available_backends, varlen_attention

__all__ = [
    "BACKENDS",
    "IMPLEMENTATION",
    "available_backends",
    "register_varlen_attention",
    "set_varlen_backend",
    "use_varlen_attention",
    "varlen_attention",
    "varlen_attention_forward",
    "varlen_attention_reference",
]
