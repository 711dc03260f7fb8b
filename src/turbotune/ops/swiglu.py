"""Gated MLP activations ``h = act(g) * u`` (SwiGLU, GeGLU) with Triton forward and backward.

The elementwise product is memory-bound; fusing it saves the ``act(g)`` intermediate that eager
PyTorch writes and reads back. The backward recomputes ``act(g)`` and ``act'(g)`` from the
saved ``g`` and ``u`` (only the two inputs are stored, as in Liger-Kernel's ``swiglu.py``).
Everything is computed in fp32 and rounded once at the store, where HF's ``LlamaMLP`` rounds
``silu(g)`` to the input dtype before the multiply.

``swiglu_forward`` / ``swiglu_backward`` (and the GeGLU pair) are plain tensor functions
without autograd, for fused blocks that write their own backward (the LoRA MLP).
``swiglu_backward_with_h`` (and its GeGLU twin; kernel and launcher in ``glu_backward_h.py``)
also writes ``h`` (optionally ``D(h)``, dropped out by a keep mask) from the same pass: a block
whose backward needs ``h`` after ``dh`` (the LoRA MLP's down adapter, ``dA = g^T D(h)``) then
reads ``g`` and ``u`` once instead of twice. The activation maths every GLU kernel shares is in
``glu_activation.py``.
"""

from __future__ import annotations

import torch

from turbotune.ops import reference
from turbotune.ops._triton import tl, triton, use_triton
from turbotune.ops.glu_activation import (  # re-exported: other GLU kernels import them here
    _ACTIVATION_IDS,
    Activation,
    _act_and_grad,
    _as_rows,
    _backward_rows,
    _check,
    _gelu_activation,
    _grid,
)

# The backward-with-h kernel is also found here (the old path) by the sm_90 compile check.
from turbotune.ops.glu_backward_h import _bwd_h_kernel as _bwd_h_kernel
from turbotune.ops.glu_backward_h import _glu_backward_with_h

__all__ = [
    "GLUFunction",
    "geglu",
    "geglu_backward",
    "geglu_backward_with_h",
    "geglu_forward",
    "swiglu",
    "swiglu_backward",
    "swiglu_backward_with_h",
    "swiglu_forward",
]


@triton.jit
def _fwd_kernel(
    h_ptr,
    stride_hm,
    g_ptr,
    stride_gm,
    u_ptr,
    stride_um,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """``h = act(g) * u`` on one block of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, ACTIVATION)
    tl.store(h_ptr + row * stride_hm + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    dg_ptr,
    stride_dgm,
    du_ptr,
    stride_dum,
    dh_ptr,
    stride_dhm,
    g_ptr,
    stride_gm,
    u_ptr,
    stride_um,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """``dg = dh * u * act'(g)``, ``du = dh * act(g)`` on one block of one row.

    ``dg``/``du`` may alias ``g``/``u`` (in-place backward): each element is read before written.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * stride_dhm + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, ACTIVATION)
    tl.store(
        dg_ptr + row * stride_dgm + cols, (dh * u * dact).to(dg_ptr.dtype.element_ty), mask=mask
    )
    tl.store(du_ptr + row * stride_dum + cols, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)


def _glu_forward(
    gate: torch.Tensor, up: torch.Tensor, activation: Activation, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The forward launch; ``out``: ``[N, I]`` rows to write ``h`` into (unit column stride,
    any row stride, e.g. a column view of a wider buffer), else a new tensor."""
    _check(gate, up)
    g, u = _as_rows(gate), _as_rows(up)
    dtype = torch.promote_types(g.dtype, u.dtype)
    if out is not None and (out.shape != g.shape or out.dtype != dtype or out.stride(1) != 1):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} cannot hold h {tuple(g.shape)}")
    h = torch.empty(g.shape, dtype=dtype, device=g.device) if out is None else out
    if h.numel():
        grid, block = _grid(*g.shape)
        _fwd_kernel[grid](
            h, h.stride(0), g, g.stride(0), u, u.stride(0), g.shape[1],
            ACTIVATION=_ACTIVATION_IDS[activation], BLOCK_SIZE=block,
        )  # fmt: skip
    return h if out is not None else h.view(gate.shape)


def _glu_backward(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Activation,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    g, u, dh, dg, du, inplace = _backward_rows(grad_h, gate, up, inplace)
    if g.numel():
        grid, block = _grid(*g.shape)
        _bwd_kernel[grid](
            dg, dg.stride(0), du, du.stride(0), dh, dh.stride(0), g, g.stride(0), u, u.stride(0),
            g.shape[1], ACTIVATION=_ACTIVATION_IDS[activation], BLOCK_SIZE=block,
        )  # fmt: skip
    if inplace:
        return gate, up
    return dg.view(gate.shape), du.view(up.shape)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` without autograd (Triton, or eager where Triton does not run).

    Args:
        gate: ``[..., I]``, unit last-dim stride preferred (else copied).
        up: ``[..., I]``.

    Returns:
        ``[..., I]`` in ``promote(gate.dtype, up.dtype)``.
    """
    if use_triton(gate, up):
        return _glu_forward(gate, up, "silu")
    return reference.swiglu(gate, up)


def swiglu_backward(
    grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``h = silu(gate) * up`` without autograd.

    Args:
        grad_h: ``[..., I]`` gradient of ``h``.
        gate: ``[..., I]`` the forward's gate input.
        up: ``[..., I]`` the forward's up input.
        inplace: write ``grad_gate``/``grad_up`` into ``gate``/``up`` (saves two activations of
            memory when the caller no longer needs them).

    Returns:
        ``(grad_gate, grad_up)`` in the dtypes of ``gate`` and ``up``.
    """
    if use_triton(grad_h, gate, up):
        return _glu_backward(grad_h, gate, up, "silu", inplace)
    return reference.glu_backward(grad_h, gate, up, "silu")


def _backward_with_h(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Activation,
    inplace: bool,
    out_h: torch.Tensor | None,
    keep: torch.Tensor | None,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel or eager reference; the eager path honours ``inplace`` and ``out_h`` by copies."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if keep is not None and keep.shape != gate.shape:
        raise ValueError(f"keep {tuple(keep.shape)} must have gate's shape {tuple(gate.shape)}")
    if keep is not None and keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask, got {keep.dtype}")
    tensors = (grad_h, gate, up) if keep is None else (grad_h, gate, up, keep)
    if use_triton(*tensors):
        return _glu_backward_with_h(grad_h, gate, up, activation, inplace, out_h, keep, dropout)
    _check(gate, up)
    dg, du, h = reference.glu_backward_with_h(grad_h, gate, up, activation, keep, dropout)
    if inplace:
        dg, du = gate.copy_(dg), up.copy_(du)
    return dg, du, h if out_h is None else out_h.copy_(h)


def swiglu_backward_with_h(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    inplace: bool = False,
    out_h: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``h = silu(gate) * up`` and ``h`` itself from one pass over the inputs.

    For a backward that needs ``h`` after ``grad_h`` (the LoRA MLP's down adapter): reads
    ``grad_h``, ``gate`` and ``up`` once, writes ``grad_gate``, ``grad_up`` and ``h`` (3 reads,
    3 writes) where ``swiglu_forward`` then ``swiglu_backward`` would take 5 reads.

    Args:
        grad_h: ``[..., I]`` gradient of ``h``.
        gate: ``[..., I]`` the forward's gate input.
        up: ``[..., I]`` the forward's up input.
        inplace: write ``grad_gate``/``grad_up`` into ``gate``/``up``.
        out_h: where to write ``h`` (``[..., I]``); may be ``grad_h`` itself (each element is
            read before it is written). None: a new tensor in ``promote(gate, up)``'s dtype.
        keep: optional bool keep mask (``gate``'s shape): ``h`` is then written dropped out,
            ``D(h) = h * keep / (1 - dropout)``.
        dropout: the probability ``keep`` was drawn with.

    Returns:
        ``(grad_gate, grad_up, h)``; ``h`` equals ``swiglu_forward``'s bit for bit (on the
        kernel; without ``keep``).
    """
    return _backward_with_h(grad_h, gate, up, "silu", inplace, out_h, keep, dropout)


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` without autograd; see :func:`swiglu_forward`."""
    if use_triton(gate, up):
        return _glu_forward(gate, up, _gelu_activation(approximate))
    return reference.geglu(gate, up, approximate)


def geglu_backward(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    approximate: str = "tanh",
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``h = gelu(gate, approximate) * up``; see :func:`swiglu_backward`."""
    activation = _gelu_activation(approximate)
    if use_triton(grad_h, gate, up):
        return _glu_backward(grad_h, gate, up, activation, inplace)
    return reference.glu_backward(grad_h, gate, up, activation)


def geglu_backward_with_h(
    grad_h: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    approximate: str = "tanh",
    *,
    inplace: bool = False,
    out_h: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``h = gelu(gate, approximate) * up`` and ``h``; see
    :func:`swiglu_backward_with_h`."""
    activation = _gelu_activation(approximate)
    return _backward_with_h(grad_h, gate, up, activation, inplace, out_h, keep, dropout)


class GLUFunction(torch.autograd.Function):
    """Autograd glue for the gated activations; saves only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return _glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = _glu_backward(grad_h, gate, up, ctx.activation, inplace=False)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up``, differentiable; Triton when it runs, else eager.

    Args:
        gate: ``[..., I]`` output of the gate projection.
        up: ``[..., I]`` output of the up projection.

    Returns:
        ``[..., I]``.
    """
    if use_triton(gate, up):
        return GLUFunction.apply(gate, up, "silu")
    return reference.swiglu(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU ``gelu(gate) * up`` (``approximate`` ``"tanh"`` or ``"none"``), differentiable."""
    activation = _gelu_activation(approximate)
    if use_triton(gate, up):
        return GLUFunction.apply(gate, up, activation)
    return reference.geglu(gate, up, approximate)
