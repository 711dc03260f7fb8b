"""The gated activation's backward and the down adapter's ``dA = g^T h`` in one pass, no ``h``.

Design note. The LoRA MLP's backward (``ops/lora_mlp_backward.py``) has, after the down
projection's input backward, ``dh`` ``[M, I]`` and ``g = s dy B_down`` ``[M, r]``. Before this
module, one kernel read ``dh``, ``e``, ``u`` and wrote ``de``, ``du`` and ``h = act(e) * u``
(over ``dh``), and a cuBLAS ``mm`` read ``h`` back for ``dA = g^T h``: 4 reads and 3 writes of
``[M, I]``. Here ``h`` never leaves the registers: each program owns a column block of ``I``,
walks the rows of ``M`` in ``BLOCK_M`` chunks, writes ``de``, ``du`` over ``e``, ``u`` and
accumulates its ``[r, BLOCK_I]`` slice of ``dA`` in fp32 with ``tl.dot`` (3 reads, 2 writes; at
Llama-8B's ``M = 4096``, ``I = 14336`` in bf16, 235 MB less traffic per layer and step).

``h`` is rounded to ``dh``'s dtype before the product, as ``swiglu._bwd_h_kernel`` stores it, so
``dA`` equals ``g^T h`` of the old path up to summation order (and it is not rounded to the
compute dtype before the cast to ``A``'s dtype). ``tl.dot`` needs every dimension >= 16: ``r`` is
padded to a power of two >= 16 by masking rows of ``g^T``.

Only the column grid keeps ``dA`` free of atomics and partial buffers, but at ``I = 14336`` it
has only ``I / BLOCK_I`` programs (224 at 64) for 132 SMs. ``split_m > 1`` also splits the rows:
each of ``split_m`` row ranges writes an fp32 partial ``[r, I]``, summed after the kernel (a
``[split_m, r, I]`` reduction, ~1 MB per split at Llama-8B). ``CONFIG`` holds the launch
settings; ``benchmarks/glu_lora_backward.py`` measures the candidates on a GPU.

No dropout on down: ``D(h)`` under a keep mask stays on the old path (``swiglu``'s kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from turbotune.ops._triton import tl, triton, use_triton
from turbotune.ops.swiglu import _act_and_grad

__all__ = [
    "CONFIG",
    "ENABLED",
    "LaunchConfig",
    "glu_backward_lora_da",
    "row_ranges",
    "supported",
    "with_config",
]

Activation = Literal["silu", "gelu_tanh", "gelu"]
_ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

ENABLED = True
"""A/B switch: False keeps the old path (``swiglu_backward_with_h`` + ``mm``)."""


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of :func:`glu_backward_lora_da`'s kernel."""

    block_i: int = 64
    """Columns of ``I`` per program (a power of two >= 16)."""
    block_m: int = 32
    """Rows per loop step (a power of two >= 16)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 2
    """Software-pipelining depth of the row loop."""
    split_m: int = 0
    """Row ranges (fp32 partials of ``dA`` when > 1); 0 picks enough ranges for about four
    programs per SM."""


CONFIG = LaunchConfig()


@triton.jit
def _bwd_da_kernel(
    de_ptr,
    stride_dem,
    du_ptr,
    stride_dum,
    dh_ptr,
    stride_dhm,
    e_ptr,
    stride_em,
    u_ptr,
    stride_um,
    g_ptr,
    stride_gm,
    stride_gr,
    da_ptr,
    stride_das,
    stride_dar,
    n_rows,
    n_cols,
    rank,
    rows_per_split,
    ACTIVATION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``de = dh * u * act'(e)``, ``du = dh * act(e)`` and ``dA += g^T h`` with ``h = act(e) * u``.

    Program ``(i, s)`` owns columns ``[i BLOCK_I, (i + 1) BLOCK_I)`` of rows
    ``[s rows_per_split, (s + 1) rows_per_split)`` and writes its ``[r, BLOCK_I]`` sum of
    ``g^T h`` to slice ``s`` of ``da`` (in ``da``'s dtype). ``de``/``du`` may alias ``e``/``u``:
    each element is read before it is written, by the one program that owns it. ``DOT_FP32``
    feeds ``tl.dot`` the same (rounded) values as fp32: the Triton interpreter's bf16 ``tl.dot``
    returns garbage (Triton 3.9, see ``gptq.py``), its fp32 one is exact.
    """
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_mask = cols < n_cols
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros((R_PAD, BLOCK_I), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * stride may pass 2^31
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dh = tl.load(dh_ptr + rows[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0)
        e = tl.load(e_ptr + rows[:, None] * stride_em + cols[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
        dh, e, u = dh.to(tl.float32), e.to(tl.float32), u.to(tl.float32)
        act, dact = _act_and_grad(e, ACTIVATION)
        de = (dh * u * dact).to(de_ptr.dtype.element_ty)
        tl.store(de_ptr + rows[:, None] * stride_dem + cols[None, :], de, mask=mask)
        du = (dh * act).to(du_ptr.dtype.element_ty)
        tl.store(du_ptr + rows[:, None] * stride_dum + cols[None, :], du, mask=mask)
        # Rounded as the old kernel stored h; masked rows and columns are 0 (act(0) * 0).
        h = (act * u).to(dh_ptr.dtype.element_ty)
        g_t = tl.load(
            g_ptr + rows[None, :] * stride_gm + ranks[:, None] * stride_gr,
            mask=rank_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            g_t, h = g_t.to(tl.float32), h.to(tl.float32)
        acc = tl.dot(g_t, h, acc, input_precision=DOT_PRECISION)
    da_ptrs = da_ptr + split * stride_das + ranks[:, None] * stride_dar + cols[None, :]
    tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=rank_mask[:, None] & col_mask[None, :])


def supported(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the kernel takes these operands as they are: enabled, Triton runs, 2-D row-major
    ``[M, I]`` (any row stride, e.g. column views of ``[e | u]``) and ``g`` ``[M, r]``."""
    if not ENABLED or not use_triton(dh, e, u, g):
        return False
    if not (dh.ndim == e.ndim == u.ndim == g.ndim == 2):
        return False
    if not (dh.shape == e.shape == u.shape and g.shape[0] == dh.shape[0]):
        return False
    return dh.stride(1) == e.stride(1) == u.stride(1) == 1 and dh.is_floating_point()


def row_ranges(
    n_rows: int, n_cols: int, config: LaunchConfig, device: torch.device
) -> tuple[int, int]:
    """``(ranges, rows per range)`` of a launch: ``config.split_m`` ranges, or (0) about four
    programs per SM, at most one range per 256 rows; whole ``block_m`` steps per range."""
    n_col_blocks = triton.cdiv(n_cols, config.block_i)
    if config.split_m > 0:
        splits = config.split_m
    elif device.type != "cuda":
        splits = 2 if n_rows >= 2 * config.block_m else 1  # still exercises the partial sums
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(triton.cdiv(4 * sms, n_col_blocks), n_rows // 256)
    splits = max(1, min(splits, triton.cdiv(n_rows, config.block_m)))
    per_range = triton.cdiv(triton.cdiv(n_rows, splits), config.block_m) * config.block_m
    return max(1, triton.cdiv(n_rows, per_range)), per_range  # no empty range at the end


def glu_backward_lora_da(
    dh: torch.Tensor,
    e: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    activation: Activation,
    out_dtype: torch.dtype,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``de``, ``du`` written over ``e``, ``u`` and ``dA = g^T (act(e) * u)`` returned.

    Call only where :func:`supported` holds (the caller keeps the eager path otherwise).

    Args:
        dh: ``[M, I]`` gradient of ``h = act(e) * u`` (read only).
        e: ``[M, I]`` gate output; overwritten by ``de`` (unit column stride).
        u: ``[M, I]`` up output; overwritten by ``du``.
        g: ``[M, r]`` ``s dy B`` of the down adapter (cast to ``dh``'s dtype if it differs).
        activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"``.
        out_dtype: dtype of ``dA`` (the down adapter's ``A``).
        config: launch settings; None: :data:`CONFIG`.

    Returns:
        ``dA`` ``[r, I]`` in ``out_dtype``, summed in fp32.
    """
    config = CONFIG if config is None else config
    n_rows, n_cols = dh.shape
    rank = g.shape[1]
    g = g if g.dtype == dh.dtype else g.to(dh.dtype)
    if n_rows == 0 or rank == 0 or n_cols == 0:
        return torch.zeros(rank, n_cols, dtype=out_dtype, device=dh.device)
    splits, rows_per_split = row_ranges(n_rows, n_cols, config, dh.device)
    # One range writes dA itself; several write fp32 partials.
    partial_dtype = out_dtype if splits == 1 else torch.float32
    da = torch.empty(splits, rank, n_cols, dtype=partial_dtype, device=dh.device)
    dot_fp32 = not dh.is_cuda  # the interpreter
    _bwd_da_kernel[(triton.cdiv(n_cols, config.block_i), splits)](
        e, e.stride(0), u, u.stride(0), dh, dh.stride(0), e, e.stride(0), u, u.stride(0),
        g, g.stride(0), g.stride(1), da, da.stride(0), da.stride(1),
        n_rows, n_cols, rank, rows_per_split,
        ACTIVATION=_ACTIVATION_IDS[activation], R_PAD=max(16, triton.next_power_of_2(rank)),
        BLOCK_M=config.block_m, BLOCK_I=config.block_i,
        DOT_PRECISION="ieee" if dot_fp32 or dh.dtype == torch.float32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits == 1:
        return da[0]
    return da.sum(0).to(out_dtype)


def with_config(**changes: int) -> LaunchConfig:
    """:data:`CONFIG` with some fields changed (for benchmarks)."""
    return replace(CONFIG, **changes)
