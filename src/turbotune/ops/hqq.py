"""Dequantize HQQ storage (``quant/hqq.py``) straight into the compute dtype.

Design note. A frozen HQQ weight is dequantized on the fly, once in forward and once in
backward, so the dense matrix never outlives the matmul that needs it. One Triton kernel reads a
``[BLOCK_R, BLOCK_C]`` tile of the stored matrix ``S`` (``W`` for ``axis=1``, ``W^T`` for
``axis=0``): its packed codes, the group's ``scale`` and ``zero``, and writes

    S[r, c] = (code[r, c] - zero[r, c // GROUP]) * scale[r, c // GROUP]      (fp32, cast once)

through the output's strides, so ``axis=0`` storage lands transposed in a row-major ``[out, in]``
buffer and a row or column block of a wider buffer (``out=``, e.g. q/k/v stacked) is written in
place. 4-bit codes come two per byte and are split with ``tl.interleave`` (first code in the high
nibble); other widths pick their bit field out of a uint8 or int32 word per element (the word is
read from cache for each of its codes). The layout is written out in ``ops/reference.py``, whose
:func:`~turbotune.ops.reference.dequantize_hqq_reference` is the eager twin: same order of
operations, so the two agree exactly (Triton's CPU interpreter truncates fp32 -> bf16 instead of
rounding to nearest: one bf16 ulp there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from turbotune.ops._triton import HAS_TRITON, use_triton
from turbotune.ops.reference import dequantize_hqq_reference, hqq_word_layout

if TYPE_CHECKING:
    from turbotune.quant.hqq import HQQWeight

__all__ = ["dequantize_hqq", "dequantize_hqq_launch"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_hqq_kernel(
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        n_rows,
        n_cols,
        stride_packed,
        stride_meta,
        stride_out_r,
        stride_out_c,
        BITS: tl.constexpr,
        PER_WORD: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One ``[BLOCK_R, BLOCK_C]`` tile of ``S``; ``stride_packed`` counts words."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        if BITS == 4:
            # Two codes per byte: a tile of BLOCK_C // 2 bytes, split and interleaved.
            byte_cols = tl.program_id(1).to(tl.int64) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
            byte_mask = row_ok[:, None] & (byte_cols < (n_cols + 1) // 2)[None, :]
            byte = tl.load(
                packed_ptr + rows[:, None] * stride_packed + byte_cols[None, :],
                mask=byte_mask,
                other=0,
            ).to(tl.int32)
            code = tl.interleave(byte >> 4, byte & 0xF)
        else:
            word = tl.load(
                packed_ptr + rows[:, None] * stride_packed + (cols // PER_WORD)[None, :],
                mask=mask,
                other=0,
            ).to(tl.int32)
            shift = ((PER_WORD - 1 - cols % PER_WORD) * BITS).to(tl.int32)
            code = (word >> shift[None, :]) & ((1 << BITS) - 1)
        meta = rows[:, None] * stride_meta + (cols // GROUP)[None, :]
        scale = tl.load(scale_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        value = (code.to(tl.float32) - zero) * scale
        dst = out_ptr + rows[:, None] * stride_out_r + cols[None, :] * stride_out_c
        tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_R = 16
_BLOCK_C = 256


def _words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The packed rows as uint8 bytes or int32 words (whatever storage dtype holds them)."""
    _, word_bytes = hqq_word_layout(bits)
    data = packed if packed.is_contiguous() else packed.contiguous()
    data = data if data.dtype is torch.uint8 else data.view(torch.uint8)
    return data.view(torch.int32) if word_bytes == 4 else data


def _output(shape: tuple[int, int], dtype, device, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dim() != 2:
        raise ValueError(f"out must be a {tuple(shape)} tensor, got {tuple(out.shape)}")
    return out


def dequantize_hqq_launch(
    weight: HQQWeight, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the Triton dequantizer on ``weight``'s storage.

    Args:
        weight: an :class:`~turbotune.quant.hqq.HQQWeight` (or any object with its fields).
        dtype: output dtype (ignored when ``out`` is given).
        out: optional ``weight.shape`` tensor to write into, any strides (a row or column block
            of a larger buffer).

    Returns:
        ``[out_features, in_features]`` tensor (``out`` when given).
    """
    out = _output(weight.shape, dtype, weight.packed.device, out)
    n_out, n_in = weight.shape
    if n_out == 0 or n_in == 0:
        return out
    words = _words(weight.packed, weight.bits)
    n_rows, n_cols = (n_out, n_in) if weight.axis == 1 else (n_in, n_out)
    stride_r, stride_c = out.stride() if weight.axis == 1 else out.stride()[::-1]
    per_word, _ = hqq_word_layout(weight.bits)
    scale, zero = weight.scale, weight.zero
    grid = (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(n_cols, _BLOCK_C))
    _dequant_hqq_kernel[grid](
        words, scale, zero, out, n_rows, n_cols, words.stride(0), scale.stride(0),
        stride_r, stride_c,
        BITS=weight.bits, PER_WORD=per_word, GROUP=weight.group_size,
        BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
    )  # fmt: skip
    return out


def dequantize_hqq(
    weight: HQQWeight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` of an HQQ weight: Triton where it runs, else eager.

    Args:
        weight: the quantized weight.
        dtype: output dtype (default fp32; ``out``'s dtype wins when given).
        out: optional destination (see :func:`dequantize_hqq_launch`).
    """
    dtype = out.dtype if out is not None else (dtype or torch.float32)
    if not (weight.scale.is_contiguous() and weight.zero.is_contiguous()):
        weight = weight._replace(scale=weight.scale.contiguous(), zero=weight.zero.contiguous())
    if use_triton(weight.packed):
        return dequantize_hqq_launch(weight, dtype, out)
    dense = dequantize_hqq_reference(
        weight.packed, weight.scale, weight.zero, weight.shape, weight.bits, weight.group_size,
        weight.axis, dtype,
    )  # fmt: skip
    return dense if out is None else out.copy_(dense)
