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
from typing import Any

import torch

from turbotune.ops._triton import HAS_TRITON, use_triton
from turbotune.ops.reference import code_table_4bit, dequantize_4bit_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

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
        value = tl.load(code_ptr + nib)
        block = offs // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
            absmax = tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_BYTES = 1024
_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 code table on ``device``, cached (a weight is dequantized every step)."""
    key = (quant_type, device)
    if key not in _CODE_CACHE:
        _CODE_CACHE[key] = code_table_4bit(quant_type, device)
    return _CODE_CACHE[key]


def _packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed storage as a flat uint8 tensor, whatever ``quant_storage`` dtype holds it."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return data.contiguous().view(torch.uint8).reshape(-1)


def dequantize_4bit_launch(
    packed: torch.Tensor, quant_state: Any, dtype: torch.dtype
) -> torch.Tensor:
    """Launch the Triton dequantizer.

    Args:
        packed: ``[ceil(n / 2)]`` uint8, the packed nibbles.
        quant_state: a bitsandbytes ``QuantState`` (``absmax``, ``shape``, ``blocksize``,
            ``quant_type``; ``state2`` and ``offset`` when double-quantized).
        dtype: output dtype.

    Returns:
        ``quant_state.shape`` tensor of ``dtype``.
    """
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    code = _code(quant_state.quant_type, packed.device)
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    if state2 is not None:
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
        code2, absmax2, blocksize2 = state2.code.float(), state2.absmax.float(), state2.blocksize
        absmax = quant_state.absmax
    else:
        # Unused by the kernel when not nested; any valid pointer will do.
        absmax = quant_state.absmax.float()
        offset, code2, absmax2, blocksize2 = code, code, code, 1
    grid = (triton.cdiv(triton.cdiv(n, 2), _BLOCK_BYTES),)
    _dequant_4bit_kernel[grid](
        packed,
        absmax,
        code,
        code2,
        absmax2,
        offset,
        out,
        n,
        BLOCKSIZE=quant_state.blocksize,
        BLOCKSIZE2=blocksize2,
        NESTED=state2 is not None,
        BLOCK_BYTES=_BLOCK_BYTES,
    )
    return out


def dequantize_nf4(
    weight: torch.Tensor, quant_state: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (NF4 or FP4, nested or not) to a dense tensor.

    Args:
        weight: a bnb ``Params4bit`` or its packed data (any ``quant_storage`` dtype).
        quant_state: the weight's ``QuantState``; defaults to ``weight.quant_state``.
        dtype: output dtype; defaults to ``quant_state.dtype`` (the dtype it was quantized from).

    Returns:
        ``quant_state.shape`` (``[out_features, in_features]`` for a Linear) tensor of ``dtype``.
    """
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError("dequantize_nf4 needs a quant_state: the weight is not quantized")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this Params4bit holds bitsandbytes' CPU inference packing (set by Linear4bit.forward in "
            "eval mode without grad on AVX512-BF16 CPUs); call .train() before the first forward"
        )
    dtype = dtype or quant_state.dtype
    packed = _packed_bytes(weight)
    if use_triton(packed):
        return dequantize_4bit_launch(packed, quant_state, dtype)
    return dequantize_4bit_reference(packed, quant_state, dtype)
