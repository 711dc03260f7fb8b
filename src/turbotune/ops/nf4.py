"""Dequantize bitsandbytes 4-bit weights (NF4 / FP4) straight into the compute dtype.

Design note. QLoRA keeps each frozen base weight as bitsandbytes 4-bit storage and dequantizes
it on the fly, once in forward and once more in backward, so the dense weight never outlives the
matmul that needs it. This file is that dequantizer: one Triton kernel that reads the packed
nibbles, the per-block scales (plain fp32 ``absmax``, or the double-quantized uint8 ``absmax``
with its own fp32 scales, 8-bit code and offset) and writes the weight in bf16/fp16/fp32.

Storage format (bitsandbytes 0.50, ``functional.quantize_4bit``), for a weight of ``n`` elements
flattened row-major from ``quant_state.shape`` (``[out_features, in_features]`` for a Linear):

- ``packed``: ``ceil(n / 2)`` bytes, any ``quant_storage`` dtype viewed as uint8; element ``2j``
  is the high nibble of byte ``j``, element ``2j + 1`` the low nibble;
- ``absmax[b]``: the scale of elements ``b * blocksize .. (b + 1) * blocksize - 1`` (fp32);
- double quantization (``quant_state.state2`` set): ``absmax[b] = code2[qabsmax[b]] *
  absmax2[b // blocksize2] + offset`` in fp32, with ``blocksize2 = 256`` in practice;
- ``w[i] = code4[nibble[i]] * absmax[i // blocksize]`` in fp32, then rounded to the out dtype,
  where ``code4`` is the 16-entry NF4 or FP4 table of ``ops/reference.py``.

The kernel mirrors that order of operations, so it matches ``bitsandbytes.functional.
dequantize_4bit`` bit for bit (on GPU the nested scale may be fused into one FMA: 1 fp32 ulp).
Without Triton (or on CPU without ``TRITON_INTERPRET=1``) the eager reference runs instead.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from turbotune.ops._triton import HAS_TRITON, use_triton
from turbotune.ops.reference import code_table_4bit, dequantize_4bit_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _values(
        nib, offs, mask, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    ):  # fmt: skip
        """fp32 ``code4[nib] * absmax[offs // BLOCKSIZE]`` of flat element indices ``offs``."""
        value = tl.load(code_ptr + nib)
        block = offs // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
            absmax = tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return value * absmax

    @triton.jit
    def _dequant_4bit_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        code2_ptr,
        absmax2_ptr,
        offset_ptr,
        out_ptr,
        n_elements,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        """out[i] = code4[nibble(i)] * absmax[i // BLOCKSIZE], one program per BLOCK_BYTES bytes."""
        pid = tl.program_id(0).to(tl.int64)
        byte_offs = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        n_bytes = (n_elements + 1) // 2
        byte = tl.load(packed_ptr + byte_offs, mask=byte_offs < n_bytes, other=0).to(tl.int32)
        # Element 2j is the high nibble of byte j: interleave(hi, lo) restores flat order.
        nib = tl.interleave(byte >> 4, byte & 0xF)
        offs = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        mask = offs < n_elements
        value = _values(
            nib, offs, mask, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr,
            BLOCKSIZE, BLOCKSIZE2, NESTED,
        )  # fmt: skip
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_4bit_rows_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        code2_ptr,
        absmax2_ptr,
        offset_ptr,
        out_ptr,
        n_cols,
        stride_out,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        """The same into rows of a wider buffer (row stride ``stride_out``): program ``(r, c)``
        writes columns ``c * 2 * BLOCK_BYTES ...`` of row ``r``; ``n_cols`` is even, so rows
        start on whole bytes."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        row_bytes = n_cols // 2
        byte_cols = chunk * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        byte_mask = byte_cols < row_bytes
        byte = tl.load(packed_ptr + row * row_bytes + byte_cols, mask=byte_mask, other=0)
        byte = byte.to(tl.int32)
        nib = tl.interleave(byte >> 4, byte & 0xF)
        cols = chunk * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        mask = cols < n_cols
        value = _values(
            nib, row * n_cols + cols, mask, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr,
            offset_ptr, BLOCKSIZE, BLOCKSIZE2, NESTED,
        )  # fmt: skip
        tl.store(out_ptr + row * stride_out + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_BYTES = 1024
_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 code table on ``device``, cached (a weight is dequantized every step)."""
    key = (quant_type, device)
    if key not in _CODE_CACHE:
        _CODE_CACHE[key] = code_table_4bit(quant_type, device)
    return _CODE_CACHE[key]


class _Static(NamedTuple):
    """Per-weight launch facts, computed once and cached on the weight's ``QuantState``.

    Rebuilding them every call cost a dozen Python-level tensor calls per dequantization (twice
    per weight per step); ``as_tensor`` of the nested offset is even an H2D copy when
    bitsandbytes left it on the CPU. Only small things are cached: the weight's own tensors are
    read from the state at each call, so a moved or reloaded weight is never held alive here.
    """

    device: torch.device
    shape: tuple[int, ...]
    n: int
    grid: tuple[int]
    code: torch.Tensor
    nested: bool
    blocksize2: int
    offset_source: Any  # the ``quant_state.offset`` object ``offset`` was made from
    offset: torch.Tensor | None


def _static(quant_state: Any, device: torch.device) -> _Static:
    cached = getattr(quant_state, "_turbotune_static", None)
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    offset = quant_state.offset if state2 is not None else None
    if cached is not None and cached.device == device and cached.offset_source is offset:
        return cached
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    n_programs = ((n + 1) // 2 + _BLOCK_BYTES - 1) // _BLOCK_BYTES  # over the packed bytes
    cached = _Static(
        device, shape, n, (n_programs,), _code(quant_state.quant_type, device),
        state2 is not None, state2.blocksize if state2 is not None else 1, offset,
        None if offset is None else torch.as_tensor(offset, dtype=torch.float32, device=device),
    )  # fmt: skip
    quant_state._turbotune_static = cached
    return cached


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.float32 else t.float()


def _packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed storage as a flat uint8 tensor, whatever ``quant_storage`` dtype holds it."""
    # bitsandbytes' Params4bit routes every tensor call through a Python __torch_function__;
    # switched off here, the view costs a third as much (plain-tensor results either way).
    with torch._C.DisableTorchFunctionSubclass():
        data = weight if weight.is_contiguous() else weight.contiguous()
        return (data if data.dtype is torch.uint8 else data.view(torch.uint8)).view(-1)


def _output(shape: tuple[int, ...], dtype: torch.dtype, device, out: torch.Tensor | None):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or not (out.is_contiguous() or _row_strided(out)):
        raise ValueError(
            f"out must be a {shape} tensor, contiguous or with unit column stride and an even "
            f"number of columns; got {tuple(out.shape)} with strides {out.stride()}"
        )
    return out


def _row_strided(out: torch.Tensor) -> bool:
    """Rows of a wider buffer (``buf[:, :n]``): the row kernel writes those."""
    return out.dim() == 2 and out.stride(1) == 1 and out.shape[1] % 2 == 0


def dequantize_4bit_launch(
    packed: torch.Tensor,
    quant_state: Any,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the Triton dequantizer.

    Args:
        packed: the packed nibbles (a ``Params4bit`` or its data, any storage dtype).
        quant_state: a bitsandbytes ``QuantState`` (``absmax``, ``shape``, ``blocksize``,
            ``quant_type``; ``state2`` and ``offset`` when double-quantized).
        dtype: output dtype.
        out: optional ``quant_state.shape`` tensor of ``dtype`` to write into: contiguous (a
            row block of a larger buffer, e.g. q, k and v stacked) or 2-D with unit column
            stride and an even number of columns (``buf[:, :in]``: a column block).

    Returns:
        ``quant_state.shape`` tensor of ``dtype`` (``out`` when given).
    """
    return _launch(_packed_bytes(packed), quant_state, dtype, out)


def _launch(
    packed: torch.Tensor, quant_state: Any, dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    st = _static(quant_state, packed.device)
    out = _output(st.shape, dtype, packed.device, out)
    if st.n == 0:
        return out
    if st.nested:
        state2 = quant_state.state2
        absmax, code2, absmax2 = quant_state.absmax, _fp32(state2.code), _fp32(state2.absmax)
        offset = st.offset
    else:
        # The nested-only pointers are unused by the kernel; any valid pointer will do.
        absmax = _fp32(quant_state.absmax)
        code2 = absmax2 = offset = st.code
    constants = dict(
        BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=st.blocksize2, NESTED=st.nested,
        BLOCK_BYTES=_BLOCK_BYTES,
    )  # fmt: skip
    if out.is_contiguous():
        _dequant_4bit_kernel[st.grid](
            packed, absmax, st.code, code2, absmax2, offset, out, st.n, **constants
        )
        return out
    n_rows, n_cols = out.shape
    grid = (n_rows, (n_cols // 2 + _BLOCK_BYTES - 1) // _BLOCK_BYTES)
    _dequant_4bit_rows_kernel[grid](
        packed, absmax, st.code, code2, absmax2, offset, out, n_cols, out.stride(0), **constants
    )  # fmt: skip
    return out


def dequantize_nf4(
    weight: torch.Tensor,
    quant_state: Any = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (NF4 or FP4, nested or not) to a dense tensor.

    Args:
        weight: a bnb ``Params4bit`` or its packed data (any ``quant_storage`` dtype).
        quant_state: the weight's ``QuantState``; defaults to ``weight.quant_state``.
        dtype: output dtype; defaults to ``quant_state.dtype`` (the dtype it was quantized from).
        out: optional ``quant_state.shape`` tensor to write into (its dtype wins): contiguous,
            or 2-D with unit column stride and an even number of columns.

    Returns:
        ``quant_state.shape`` (``[out_features, in_features]`` for a Linear) tensor of ``dtype``.
    """
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError("dequantize_nf4 needs a quant_state: the weight is not quantized")
    # ``__dict__`` rather than getattr: a missing attribute would go through bitsandbytes'
    # Python ``QuantState.__getattr__`` at every dequantization.
    if vars(quant_state).get("packing_format_for_cpu", False):
        raise ValueError(
            "this Params4bit holds bitsandbytes' CPU inference packing (set by Linear4bit.forward in "
            "eval mode without grad on AVX512-BF16 CPUs); call .train() before the first forward"
        )
    dtype = out.dtype if out is not None else (dtype or quant_state.dtype)
    if out is not None:
        _output(tuple(quant_state.shape), dtype, out.device, out)  # checks shape and layout
    packed = _packed_bytes(weight)
    if use_triton(packed):
        return _launch(packed, quant_state, dtype, out)
    dense = dequantize_4bit_reference(packed, quant_state, dtype)
    return dense if out is None else out.copy_(dense)
