"""The gated-activation backward that also writes ``h`` (or ``D(h)``): kernel and launcher.

Design note. The LoRA MLP's backward needs ``h = act(g) * u`` after ``dh``: the down adapter's
``dA = g^T D(h)``. Recomputing ``h`` by the forward kernel and then running the backward reads
``g`` and ``u`` twice (5 reads); this kernel reads ``dh``, ``g`` and ``u`` once and writes
``dg``, ``du`` and ``h`` (3 reads, 3 writes), ``h`` optionally over ``dh`` (dead after it) and
optionally dropped out by a keep mask. ``h`` is rounded from fp32 exactly as
``swiglu._fwd_kernel`` rounds it, so it equals the forward's ``h`` bit for bit. The public
entries (``swiglu_backward_with_h``, ``geglu_backward_with_h``, with the eager fallback) are in
``swiglu.py``.
"""

from __future__ import annotations

import torch

from turbotune.ops._triton import tl, triton
from turbotune.ops.glu_activation import (
    _ACTIVATION_IDS,
    Activation,
    _act_and_grad,
    _as_rows,
    _backward_rows,
    _grid,
)


@triton.jit
def _bwd_h_kernel(
    dg_ptr,
    stride_dgm,
    du_ptr,
    stride_dum,
    h_ptr,
    stride_hm,
    dh_ptr,
    stride_dhm,
    g_ptr,
    stride_gm,
    u_ptr,
    stride_um,
    keep_ptr,
    stride_km,
    keep_scale,
    n_cols,
    ACTIVATION: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """``dg = dh * u * act'(g)``, ``du = dh * act(g)`` and ``h = act(g) * u`` on one block.

    With ``HAS_KEEP``: ``h = act(g) * u * keep * keep_scale`` (``D(h)``, ``keep`` a 0/1 byte
    mask). Any output may alias an input at the same element (``dg``/``du`` over ``g``/``u``,
    ``h`` over ``dh``): every element is read before it is written. ``h`` is rounded once from
    fp32 exactly as ``swiglu._fwd_kernel`` rounds it, so it equals the forward's ``h`` bit for bit.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * stride_dhm + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, ACTIVATION)
    h = act * u
    if HAS_KEEP:
        kept = tl.load(keep_ptr + row * stride_km + cols, mask=mask, other=0)
        h = tl.where(kept != 0, h * keep_scale, 0.0)
    tl.store(
        dg_ptr + row * stride_dgm + cols, (dh * u * dact).to(dg_ptr.dtype.element_ty), mask=mask
    )
    tl.store(du_ptr + row * stride_dum + cols, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + row * stride_hm + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def _writable_rows(out: torch.Tensor) -> torch.Tensor | None:
    """``out`` as ``[N, I]`` rows over its own storage with unit column stride, else None."""
    rows = out.reshape(-1, out.shape[-1])
    return rows if rows.data_ptr() == out.data_ptr() and rows.stride(-1) == 1 else None


def _glu_backward_with_h(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Activation,
    inplace: bool,
    out_h: torch.Tensor | None,
    keep: torch.Tensor | None,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, u, dh, dg, du, inplace = _backward_rows(grad_h, gate, up, inplace)
    h = None if out_h is None else _writable_rows(out_h)
    if h is None:  # no buffer given, or one the kernel cannot write row by row
        dtype = torch.promote_types(gate.dtype, up.dtype) if out_h is None else out_h.dtype
        h = torch.empty(g.shape, dtype=dtype, device=g.device)
    # A bool mask is one byte per element: read as uint8 (a view), compared with 0 in-kernel.
    k = h if keep is None else _as_rows(keep).view(torch.uint8)
    if g.numel():
        grid, block = _grid(*g.shape)
        _bwd_h_kernel[grid](
            dg, dg.stride(0), du, du.stride(0), h, h.stride(0), dh, dh.stride(0),
            g, g.stride(0), u, u.stride(0), k, k.stride(0), 1.0 / (1.0 - dropout), g.shape[1],
            ACTIVATION=_ACTIVATION_IDS[activation], HAS_KEEP=keep is not None, BLOCK_SIZE=block,
        )  # fmt: skip
    if out_h is None:
        h = h.view(gate.shape)
    elif h.data_ptr() != out_h.data_ptr():
        h = out_h.copy_(h.view(out_h.shape))
    else:
        h = out_h
    if inplace:
        return gate, up, h
    return dg.view(gate.shape), du.view(up.shape), h
