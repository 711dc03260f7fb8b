"""Dequantize bitsandbytes 4-bit weights (NF4 / FP4) straight into the compute dtype.

Design note. QLoRA keeps each frozen base weight as bitsandbytes 4-bit storage and dequantizes
it on the fly, once in forward and once more in backward, so the dense weight never outlives the
matmul that needs it. This file is that dequantizer: Triton kernels that read the packed
nibbles, the per-block scales (plain fp32 ``absmax``, or the double-quantized uint8 ``absmax``
with its own fp32 scales, 8-bit code and offset) and write the weight in bf16/fp16/fp32, into a
contiguous tensor or into a column block of a wider buffer (``buf[:, :n]``, the row kernel).

Storage format (bitsandbytes 0.50, ``functional.quantize_4bit``), for a weight of ``n`` elements
flattened row-major from ``quant_state.shape`` (``[out_features, in_features]`` for a Linear):

- ``packed``: ``ceil(n / 2)`` bytes, any ``quant_storage`` dtype viewed as uint8; element ``2j``
  is the high nibble of byte ``j``, element ``2j + 1`` the low nibble;
- ``absmax[b]``: the scale of elements ``b * blocksize .. (b + 1) * blocksize - 1`` (fp32);
- double quantization (``quant_state.state2`` set): ``absmax[b] = code2[qabsmax[b]] *
  absmax2[b // blocksize2] + offset`` in fp32, with ``blocksize2 = 256`` in practice;
- ``w[i] = code4[nibble[i]] * absmax[i // blocksize]`` in fp32, then rounded to the out dtype,
  where ``code4`` is the 16-entry NF4 or FP4 table of ``ops/reference.py``.

The kernels mirror that order of operations, so they match ``bitsandbytes.functional.
dequantize_4bit`` bit for bit (on GPU the nested scale may be fused into one FMA: 1 fp32 ulp).
Without Triton (or on CPU without ``TRITON_INTERPRET=1``) the eager reference runs instead.

Speed: the op is memory-bound (2.5 bytes moved per bf16 element: 2 written, 0.5 read), so the
kernels keep the work per element small. A program takes a tile of whole quant blocks
(``[BLOCKS, blocksize]``, 4096 elements): each block's scale (and its nested ``code2`` /
``absmax2`` / ``offset`` lookups) is computed once per block and broadcast along its row,
which leaves one gather per element, ``code4[nibble]`` from a 64-byte table that stays in L1.
Each thread loads 4 packed bytes at a time, which become 8 outputs: one 16-byte store in bf16,
the lanes of a warp side by side (fully coalesced, no reshuffle through shared memory). Whole
tiles (every Llama shape) run without masks. The row kernel finds each block's row once per
block when the width is a multiple of the blocksize, and per element otherwise (odd widths).
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
    def _block_scales(
        absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, first_block, n_blocks,
        BLOCKS: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        MASKED: tl.constexpr,
    ):  # fmt: skip
        """fp32 ``absmax`` of quant blocks ``first_block .. first_block + BLOCKS - 1``: [BLOCKS].

        Double quantization: ``code2[qabsmax[b]] * absmax2[b // BLOCKSIZE2] + offset``.
        """
        blocks = first_block + tl.arange(0, BLOCKS)
        mask = blocks < n_blocks if MASKED else None
        if NESTED:
            q = tl.load(absmax_ptr + blocks, mask=mask, other=0 if MASKED else None)
            if BLOCKSIZE2 % BLOCKS == 0:  # first_block is a multiple of BLOCKS: one group
                scale2 = tl.load(absmax2_ptr + first_block // BLOCKSIZE2)
            else:
                group = blocks // BLOCKSIZE2
                scale2 = tl.load(absmax2_ptr + group, mask=mask, other=0.0 if MASKED else None)
            absmax = tl.load(code2_ptr + q.to(tl.int32)) * scale2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blocks, mask=mask, other=0.0 if MASKED else None)
        return absmax

    @triton.jit
    def _tile_values(
        packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, first_block,
        n_elements, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        BLOCKS: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        """fp32 ``code4[nibble] * absmax`` of ``BLOCKS`` whole quant blocks: [BLOCKS, BLOCKSIZE].

        Row ``r`` holds flat elements ``(first_block + r) * BLOCKSIZE + 0 .. BLOCKSIZE - 1``:
        one quant block, so its scale is computed once and broadcast along the row.
        """
        HALF: tl.constexpr = BLOCKSIZE // 2
        # Capping the known contiguity at VEC bytes makes each thread load VEC bytes at a time:
        # after the nibble split that is 2 * VEC outputs, one 16-byte store for VEC = 4 in bf16,
        # with the lanes of a warp side by side (a wider load would leave each lane's outputs
        # 64 bytes apart, and Triton would reshuffle them through shared memory).
        cols = tl.max_contiguous(tl.arange(0, HALF), VEC)
        local = tl.arange(0, BLOCKS)[:, None] * HALF + cols[None, :]
        tile_bytes = packed_ptr + first_block * HALF
        if MASKED:
            # Bytes left from this tile on, clamped so that the compare stays in int32.
            left = tl.minimum((n_elements + 1) // 2 - first_block * HALF, BLOCKS * HALF)
            byte = tl.load(tile_bytes + local, mask=local < left.to(tl.int32), other=0)
        else:
            byte = tl.load(tile_bytes + local)
        n_blocks = (n_elements + BLOCKSIZE - 1) // BLOCKSIZE
        scale = _block_scales(
            absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, first_block, n_blocks,
            BLOCKS, BLOCKSIZE2, NESTED, MASKED,
        )[:, None]  # fmt: skip
        byte = byte.to(tl.int32)
        # Element 2j is the high nibble of byte j: interleave(high, low) restores flat order.
        high = tl.load(code_ptr + (byte >> 4)) * scale
        low = tl.load(code_ptr + (byte & 0xF)) * scale
        return tl.interleave(high, low)

    @triton.jit
    def _dequant_4bit_kernel(
        packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
        n_elements, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        BLOCKS: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        """Contiguous ``out``: program ``p`` writes quant blocks ``p * BLOCKS ..`` (flat order)."""
        first_block = tl.program_id(0).to(tl.int64) * BLOCKS
        value = _tile_values(
            packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, first_block,
            n_elements, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, MASKED, VEC,
        ).to(out_ptr.dtype.element_ty)  # fmt: skip
        local = tl.arange(0, BLOCKS)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tile_out = out_ptr + first_block * BLOCKSIZE
        if MASKED:
            left = tl.minimum(n_elements - first_block * BLOCKSIZE, BLOCKS * BLOCKSIZE)
            tl.store(tile_out + local, value, mask=local < left.to(tl.int32))
        else:
            tl.store(tile_out + local, value)

    @triton.jit
    def _dequant_4bit_rows_kernel(
        packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
        n_elements, n_cols, stride_out, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr, BLOCKS: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr,
        WHOLE_BLOCKS: tl.constexpr,
    ):  # fmt: skip
        """Rows of a wider buffer (``out[r, c]`` at ``r * stride_out + c``), same tiles as the
        contiguous kernel. ``WHOLE_BLOCKS`` (``n_cols % BLOCKSIZE == 0``): no quant block
        crosses a row, so the row of each block is found once per block, not per element."""
        first_block = tl.program_id(0).to(tl.int64) * BLOCKS
        value = _tile_values(
            packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, first_block,
            n_elements, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, MASKED, VEC,
        ).to(out_ptr.dtype.element_ty)  # fmt: skip
        rows = tl.arange(0, BLOCKS)[:, None]
        cols = tl.arange(0, BLOCKSIZE)[None, :]
        if WHOLE_BLOCKS:
            # int32 block indices (n_elements < 2^31 * BLOCKSIZE); int64 once times the stride.
            block = tl.program_id(0) * BLOCKS + rows
            blocks_per_row = n_cols // BLOCKSIZE
            row = block // blocks_per_row
            start = row.to(tl.int64) * stride_out + (block - row * blocks_per_row) * BLOCKSIZE
            ptrs = out_ptr + start + cols
        else:  # blocks cross rows (widths that are no multiple of BLOCKSIZE): row per element
            flat = first_block * BLOCKSIZE + (rows * BLOCKSIZE + cols)
            row = flat // n_cols
            ptrs = out_ptr + row * stride_out + (flat - row * n_cols)
        if MASKED:
            left = tl.minimum(n_elements - first_block * BLOCKSIZE, BLOCKS * BLOCKSIZE)
            tl.store(ptrs, value, mask=rows * BLOCKSIZE + cols < left.to(tl.int32))
        else:
            tl.store(ptrs, value)


# Elements per program (whole quant blocks) and per thread: 4096 = 128 threads (4 warps) x 32,
# i.e. per thread four 4-byte loads of packed nibbles and four 16-byte bf16 stores.
_TILE_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 32
_BYTES_PER_LOAD = 4  # the kernels' VEC
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
    offset_source: Any  # the ``quant_state.offset`` object ``offset`` was made from
    offset: torch.Tensor | None
    tiled: bool  # the blocksize is a power of two (always, in bitsandbytes): the kernels apply
    constants: dict[str, Any]  # constexprs and num_warps of the contiguous kernel
    rows_constants: dict[str, Any]  # the same for the row-strided kernel (2-D weights)


def _tile_config(blocksize: int, n: int) -> tuple[int, int, bool]:
    """``(quant blocks per program, num_warps, masked)`` of the tiled kernels."""
    blocks = max(1, _TILE_ELEMENTS // blocksize)
    tile = blocks * blocksize
    num_warps = min(16, max(1, tile // (32 * _ELEMENTS_PER_THREAD)))
    return blocks, num_warps, n % tile != 0


def _static(quant_state: Any, device: torch.device) -> _Static:
    cached = getattr(quant_state, "_turbotune_static", None)
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    offset = quant_state.offset if state2 is not None else None
    if cached is not None and cached.device == device and cached.offset_source is offset:
        return cached
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    blocksize = quant_state.blocksize
    blocks, num_warps, masked = _tile_config(blocksize, n)
    constants = dict(
        BLOCKSIZE=blocksize, BLOCKSIZE2=state2.blocksize if state2 is not None else 1,
        NESTED=state2 is not None, BLOCKS=blocks, MASKED=masked,
        VEC=min(_BYTES_PER_LOAD, max(1, blocksize // 2)), num_warps=num_warps,
    )  # fmt: skip
    cached = _Static(
        device, shape, n, (-(-n // (blocks * blocksize)),),
        _code(quant_state.quant_type, device), state2 is not None, offset,
        None if offset is None else torch.as_tensor(offset, dtype=torch.float32, device=device),
        blocksize >= 2 and blocksize & (blocksize - 1) == 0, constants,
        dict(constants, WHOLE_BLOCKS=len(shape) == 2 and shape[-1] % blocksize == 0),
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
            f"out must be a {shape} tensor, contiguous or 2-D with unit column stride; got "
            f"{tuple(out.shape)} with strides {out.stride()}"
        )
    return out


def _row_strided(out: torch.Tensor) -> bool:
    """Rows of a wider buffer (``buf[:, :n]``): the row kernel writes those."""
    return out.dim() == 2 and out.stride(1) == 1


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
            stride (``buf[:, :in]``: a column block).

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
    if not st.tiled:  # a blocksize bitsandbytes never makes (our own quantizer takes any)
        return out.copy_(dequantize_4bit_reference(packed, quant_state, dtype))
    if st.nested:
        state2 = quant_state.state2
        absmax, code2, absmax2 = quant_state.absmax, _fp32(state2.code), _fp32(state2.absmax)
        offset = st.offset
    else:
        # The nested-only pointers are unused by the kernel; any valid pointer will do.
        absmax = _fp32(quant_state.absmax)
        code2 = absmax2 = offset = st.code
    if out.is_contiguous():
        _dequant_4bit_kernel[st.grid](
            packed, absmax, st.code, code2, absmax2, offset, out, st.n, **st.constants
        )
        return out
    _dequant_4bit_rows_kernel[st.grid](
        packed, absmax, st.code, code2, absmax2, offset, out, st.n, st.shape[1], out.stride(0),
        **st.rows_constants,
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
            or 2-D with unit column stride.

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
    packed = _packed_bytes(weight)
    if use_triton(packed):
        return _launch(packed, quant_state, dtype, out)  # checks ``out`` itself
    if out is not None:
        _output(tuple(quant_state.shape), dtype, out.device, out)  # checks shape and layout
    dense = dequantize_4bit_reference(packed, quant_state, dtype)
    return dense if out is None else out.copy_(dense)
