"""The LoRA MLP's forward tail: ``h = act(e) * u`` written with ``T = h A^T`` behind it, then
ONE GEMM.

Design note. After the gate/up group (``ops/lora.py``), the down projection with an adapter
used to cost three passes besides its base GEMM: the gated activation writes ``h`` (``[M, I]``),
``T = h A_down^T`` reads all of ``h`` again (48 us at Llama-8B, ``M = 4096``, ``I = 14336``,
on an H100), and ``y += s T B^T`` reads and writes all of ``y`` (26 us). Here:

1. :func:`glu_lora` writes ``h`` into an ``[M, I + R]`` buffer (the activation kernel writes
   straight into its rows) and ``T = h A^T`` (a cuBLAS ``mm``) into a separate ``[M, r]`` tensor
   ``t``, the only adapter product the backward reads (``ops/lora_mlp_backward.py``), copied
   into the ``R`` spare columns with zeros behind the rank. A one-pass Triton kernel computing
   ``h`` and ``T`` together was measured slower than this pair on an H100 and removed
   (``benchmarks/results/h100_202611_step_s5.md``).
2. :func:`down_forward`: ``y = [h | T] [W | sB | 0]^T``, the folded weight of
   ``ops/lora_fold.py`` (the ``W`` part dequantized straight into it), as one GEMM. The
   decoder layer's residual may ride on it too (``torch.addmm(residual, ...)``): torch copies
   it into the output and cuBLAS adds the product in place (one copy instead of an add that
   reads two tensors; an in-place ``residual.addmm_`` would save the copy too, but the
   add-norm before the MLP saves that very tensor for its backward). Plain dense
   bases in the compute dtype (``ops/lora_direct.py``) would pay a copy of ``W`` for the fold:
   there ``y = s t B^T`` is written first (rank ``r``) and ``y += h W^T`` uses ``W`` as stored,
   cuBLAS reading ``y`` in its epilogue (no read-modify-write pass of its own over ``y``): the
   ``adapter_first`` of ``ops/lora_adapter_first.py``, shared with lone projections.

What the backward finds is what the unfused path saved: ``[t, A, B]`` (``A``, ``B`` cast to
the compute dtype). ``t`` is its own small tensor: a view into ``[h | T]`` would keep the whole
buffer (117 MB per layer at 4096 tokens) alive until backward. Under activation checkpointing
the recomputed forward leaves the ``W`` part of its folded weight to the backward
(``ops/lora_stash.py``, as the stacked weight it would have built).

``ENABLED = False`` restores the separate activation, ``mm`` and ``addmm_`` (A/B measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from turbotune.ops import lora_group
from turbotune.ops._triton import use_triton
from turbotune.ops.lora_adapter_first import adapter_first, product
from turbotune.ops.lora_fold import _folded_weight, _padded
from turbotune.ops.lora_group import Layout, Slot, cast
from turbotune.ops.lora_mlp_backward import glu_forward
from turbotune.ops.lora_stash import keep
from turbotune.ops.swiglu import _glu_forward

__all__ = ["ENABLED", "applies", "down_forward", "glu_lora"]

Activation = Literal["silu", "gelu_tanh", "gelu"]

# Off: the MLP's down projection runs as before (activation kernel, T by mm, y.addmm_).
ENABLED = True


def glu_lora(
    e: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    activation: Activation,
    room: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = act(e) * u`` written with ``T = h A^T`` behind it, and ``t = T`` on its own.

    Args:
        e: ``[M, I]`` gate output (a column view of ``[e | u]`` is fine).
        u: ``[M, I]`` up output, ``e``'s dtype.
        a: ``[r, I]`` the down adapter's ``A`` in ``e``'s dtype.
        activation: the gate's activation.
        room: spare columns behind ``h`` (0, or at least ``r``): they hold ``[T | 0]``.

    Returns:
        ``(wide, t)``: ``wide`` is ``[M, I + room]`` (``h`` in its first ``I`` columns), ``t``
        ``[M, r]``, both in ``e``'s dtype.
    """
    n_rows, n_cols = e.shape
    rank = a.shape[0]
    if u.shape != e.shape or a.shape[1] != n_cols or u.dtype != e.dtype or a.dtype != e.dtype:
        raise ValueError(f"e {tuple(e.shape)}, u {tuple(u.shape)}, A {tuple(a.shape)} mismatch")
    if room and room < rank:
        raise ValueError(f"room {room} cannot hold rank {rank}")
    wide = torch.empty((n_rows, n_cols + room), dtype=e.dtype, device=e.device)
    t = torch.empty((n_rows, rank), dtype=e.dtype, device=e.device)
    h = wide.narrow(1, 0, n_cols)
    if use_triton(e, u) and e.stride(1) == 1 and u.stride(1) == 1:
        _glu_forward(e, u, activation, out=h)  # the activation kernel writes into the room's rows
    else:
        h.copy_(glu_forward(e, u, activation))
    torch.mm(h, a.t(), out=t)
    if room:
        wide.narrow(1, n_cols, rank).copy_(t)
        wide.narrow(1, n_cols + rank, room - rank).zero_()
    return wide, t


# ---- the down projection ----


def applies(down: Slot, layout: Layout) -> bool:
    """Whether :func:`down_forward` runs the down projection: an adapter without dropout, and
    either weights used as stored or a folded weight (``FOLD_ADAPTERS`` on, shape known)."""
    if not ENABLED or down.A is None or down.dropout != 0.0:
        return False
    return layout.direct or (lora_group.FOLD_ADAPTERS and layout.stackable)


def down_forward(
    e: torch.Tensor,
    u: torch.Tensor,
    down: Slot,
    layout: Layout,
    weights: Sequence[torch.Tensor] | None,
    activation: Activation,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``y = residual + (act(e) * u) W^T + b + s T B^T`` when :func:`applies`, ``h`` never a
    tensor of its own.

    Args:
        e, u: ``[M, I]`` the gate and up outputs (column views of ``[e | u]``).
        down: the down projection (adapter, no dropout).
        layout: its layout (``lora_direct.plan_group``); weights: the stored weight when
            ``layout.direct``.
        activation: the gate's activation.
        residual: optional ``[M, out]`` in ``e``'s dtype, added by the GEMM (``addmm``: torch
            copies it into the output, cuBLAS then reads it in its epilogue).

    Returns:
        ``y [M, out]`` and what the down projection's backward reads: ``[t, A, B]``.
    """
    dtype = e.dtype
    a, b = cast(down.A, dtype), cast(down.B, dtype)
    if layout.direct:  # the fold would copy W: W as stored, the adapter term written first
        h, t = glu_lora(e, u, a, activation)
        y = adapter_first(h, weights[0], t, b, down.scaling, down.bias, residual)
        return y, [t, a, b]
    wide, t = glu_lora(e, u, a, activation, room=_padded(a.shape[0]))
    weight = _folded_weight([down], layout, dtype, e.device)
    # A checkpoint recomputation: the backward's dh = dy W reads the W part (a column view).
    keep("stacked", [down], weight.narrow(1, 0, e.shape[1]))
    return product(wide, weight.t(), residual, down.bias), [t, a, b]
