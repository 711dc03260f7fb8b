"""RMSNorm with a Triton forward and backward (input and weight gradients).

One program normalises one row held entirely in registers; the forward saves only the
per-row ``rstd`` (fp32), so the backward recomputes the normalised row instead of storing it.
The weight gradient is a reduction over all rows: each of a fixed number of persistent
programs sums its rows into an fp32 partial row, and the partials are added in PyTorch (the
two-stage scheme of Liger-Kernel's ``rms_norm.py``), so full fine-tuning of norm weights works
without atomics and deterministically.

Casting follows HF: ``"llama"`` rounds the normalised row to the input dtype before the weight
multiply (``LlamaRMSNorm``); ``"gemma"`` stays in fp32 until the final store (``GemmaRMSNorm``).
"""

from __future__ import annotations

import torch

from turbotune.ops import reference, spare_columns
from turbotune.ops._triton import (
    backward_programs,
    row_block_settings,
    tl,
    triton,
    use_triton,
)
from turbotune.ops.reference import Casting

__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_backward", "rms_norm_forward"]


# ---- the row maths, shared with ops/add_norm.py (inlined by Triton: one source of truth) ----


@triton.jit
def normalized_row(x, w, rstd_ptr, row, n_cols, eps, round_ptr, CAST_TO_INPUT: tl.constexpr):
    """fp32 ``w * cast(x * rstd)`` of one fp32 row (``w`` with its offset added); stores
    ``rstd = 1 / sqrt(mean(x^2) + eps)``. ``cast`` rounds to ``round_ptr``'s dtype when
    ``CAST_TO_INPUT`` (Llama) and is the identity otherwise."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    x_normed = x * rstd
    if CAST_TO_INPUT:
        x_normed = x_normed.to(round_ptr.dtype.element_ty).to(tl.float32)
    return x_normed * w


@triton.jit
def row_input_grad(x, dy, w, rstd, n_cols):
    """``(dx, n)`` of one fp32 row: ``n = x * rstd``, ``g = dy * w``,
    ``dx = rstd * (g - n * mean(g * n))``."""
    x_normed = x * rstd
    g = dy * w
    dx = rstd * (g - x_normed * (tl.sum(g * x_normed, axis=0) / n_cols))
    return dx, x_normed


@triton.jit
def row_weight_grad(dy, x_normed, round_ptr, CAST_TO_INPUT: tl.constexpr):
    """One row's term of ``dw = sum_rows(dy * cast(n))``."""
    if CAST_TO_INPUT:
        x_normed = x_normed.to(round_ptr.dtype.element_ty).to(tl.float32)
    return dy * x_normed


@triton.jit
def _fwd_kernel(
    y_ptr,
    stride_ym,
    x_ptr,
    stride_xm,
    w_ptr,
    rstd_ptr,
    n_cols,
    eps,
    offset,
    CAST_TO_INPUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Forward of one row.

    ``rstd = 1 / sqrt(mean(x^2) + eps)``, ``y = (offset + w) * cast(x * rstd)`` where ``cast``
    rounds to the input dtype when ``CAST_TO_INPUT`` (Llama) and is the identity otherwise.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    y = normalized_row(x, w, rstd_ptr, row, n_cols, eps, x_ptr, CAST_TO_INPUT)
    tl.store(y_ptr + row * stride_ym + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    dx_ptr,
    stride_dxm,
    dy_ptr,
    stride_dym,
    x_ptr,
    stride_xm,
    w_ptr,
    rstd_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    CAST_TO_INPUT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Backward of ``rows_per_program`` consecutive rows; one fp32 partial ``dw`` row per program.

    With ``n = x * rstd`` and ``g = dy * (offset + w)``:
    ``dx = rstd * (g - n * mean(g * n))`` and ``dw = sum_rows(dy * cast(n))``.
    """
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
        dx, x_normed = row_input_grad(x, dy, w, tl.load(rstd_ptr + row), n_cols)
        tl.store(dx_ptr + row * stride_dxm + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += row_weight_grad(dy, x_normed, x_ptr, CAST_TO_INPUT)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., H] -> [N, H]`` without a copy when possible; the kernels need unit column stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    casting: Casting,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        x: ``[N, H]`` with unit column stride (any row stride).
        weight: ``[H]``.
        eps, offset, casting: see :func:`rms_norm`.

    Returns:
        ``(y [N, H], rstd [N] fp32)``.
    """
    n_rows, n_cols = x.shape
    block, num_warps = row_block_settings(n_cols)
    out_dtype = x.dtype if casting == "gemma" else torch.promote_types(x.dtype, weight.dtype)
    # With spare columns behind it for a folded LoRA group (ops/spare_columns.py).
    y = spare_columns.rows_with_room(n_rows, n_cols, out_dtype, x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _fwd_kernel[(n_rows,)](
            y, y.stride(0), x, x.stride(0), weight.contiguous(), rstd, n_cols, eps, offset,
            CAST_TO_INPUT=casting == "llama", BLOCK_SIZE=block, num_warps=num_warps,
        )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: Casting,
    compute_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel and reduce the per-program ``dw`` partials.

    Args:
        dy: ``[N, H]`` gradient of the output, unit column stride.
        x: ``[N, H]`` the forward input.
        weight: ``[H]``.
        rstd: ``[N]`` from :func:`rms_norm_forward`.
        offset, casting: as in the forward.
        compute_dw: skip the weight gradient (frozen norm weights).

    Returns:
        ``(dx [N, H] in x.dtype, dw [H] in weight.dtype or None)``.
    """
    n_rows, n_cols = x.shape
    block, num_warps = row_block_settings(n_cols)
    n_programs, rows_per_program = backward_programs(x.device, n_rows, compute_dw)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    # Every program stores its partial row, so no fill is needed (nor any without dw).
    dw_partial = (torch.empty if n_rows > 0 or not compute_dw else torch.zeros)(
        (n_programs if compute_dw else 1, n_cols), dtype=torch.float32, device=x.device
    )
    if n_rows > 0:
        _bwd_kernel[(n_programs,)](
            dx, dx.stride(0), dy, dy.stride(0), x, x.stride(0), weight.contiguous(), rstd,
            dw_partial, n_rows, n_cols, offset, rows_per_program,
            CAST_TO_INPUT=casting == "llama", COMPUTE_DW=compute_dw,
            BLOCK_SIZE=block, num_warps=num_warps,
        )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd glue for the RMSNorm kernels; the maths lives in the kernels."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: Casting
    ) -> torch.Tensor:
        rows = _as_rows(x)
        y, rstd = rms_norm_forward(rows, weight, eps, offset, casting)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset, ctx.casting, ctx.shape = offset, casting, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(
            _as_rows(dy), rows, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1]
        )
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    casting: Casting = "llama",
) -> torch.Tensor:
    """RMSNorm ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dimension.

    Runs the Triton kernels when :func:`~turbotune.ops._triton.use_triton` allows, else the
    eager :func:`turbotune.ops.reference.rms_norm`. Differentiable in ``x`` and ``weight``.

    Args:
        x: ``[..., H]``, any strides.
        weight: ``[H]``.
        eps: added to the mean square (HF's ``variance_epsilon``).
        offset: 0 (Llama) or 1 (Gemma, whose weights are stored as ``w - 1``).
        casting: ``"llama"`` or ``"gemma"`` rounding semantics, see the module docstring.

    Returns:
        ``[..., H]`` in ``promote(x.dtype, weight.dtype)`` (llama) or ``x.dtype`` (gemma).
    """
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting)
    return reference.rms_norm(x, weight, eps, offset, casting)
