"""The GPTQ checkpoint layout (AutoGPTQ v1, ``checkpoint_format: "gptq"``): pack and unpack.

Design note. This is the layout that AutoGPTQ, GPTQModel (its ``v1`` format), optimum and
transformers' GPTQ integration read and write, so a checkpoint written here loads there and
vice versa. Per linear layer with ``in`` input and ``out`` output features, ``bits`` in
{2, 3, 4, 8} and ``n_groups = ceil(in / group_size)`` (``group_size = -1``: one group):

- ``qweight`` int32 ``[in * bits / 32, out]``: the integer codes ``q[c, o]`` packed along the
  INPUT dim. The words of one column form a little-endian bit stream, code ``c`` at stream bits
  ``[bits * c, bits * c + bits)``. For 2/4/8 bits that is ``32 / bits`` codes per word, code
  ``c`` in word ``c * bits // 32`` at shift ``c * bits % 32``; for 3 bits 32 codes fill 3
  words and codes 10 and 21 of each block straddle two words (AutoGPTQ's 3-bit packing).
- ``qzeros`` int32 ``[n_groups, out * bits / 32]``: the zero points packed the same way along
  the OUTPUT dim, stored MINUS ONE. This is the v1 off-by-one: AutoGPTQ's packer subtracts 1
  before packing and its readers add 1 back. We store ``(z - 1) mod 2**bits`` and read
  ``(stored + 1) mod 2**bits`` (the masking of AutoGPTQ's Triton kernel). Portability caveat:
  ``z = 0`` is stored as ``2**bits - 1``, which readers that add 1 without masking (AutoGPTQ's
  CUDA path, GPTQModel's v1 -> v2 conversion, which adds 1 with carry) misread; a quantizer that
  wants every reader to agree keeps ``z >= 1`` (symmetric quantization uses
  ``z = 2**(bits - 1)``, stored as ``2**(bits - 1) - 1``, e.g. ``0x77777777`` at 4 bits).
- ``scales`` fp16 ``[n_groups, out]``.
- ``g_idx`` int32 ``[in]``: the group of each input column. Without act-order it is
  ``c // group_size``; with act-order (``desc_act``) the columns were quantized in a permuted
  order, so ``g_idx`` is non-monotonic, while ``qweight`` still stores columns in their ORIGINAL
  order (readers index scales and zeros through ``g_idx``, never reorder the checkpoint).

Dequantization: ``W[o, c] = scales[g, o] * (q[c, o] - z[g, o])`` with ``g = g_idx[c]``
(:func:`dequantize_gptq`, ``[out, in]`` like ``nn.Linear.weight``). ``in`` and ``out`` must be
multiples of ``32 / bits`` (2/4/8 bits) or of 32 (3 bits), which every real model satisfies.
The ecosystem writes shapes as ``in // 32 * bits``, the same numbers whenever ``in % 32 == 0``.

Sources (read for the layout, not copied): AutoGPTQ ``qlinear_cuda_old.py`` (``pack``, the
eager dequantization), GPTQModel ``utils/model.py`` (v1/v2 conversion).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from turbotune.ops.reference import dequantize_gptq_reference, unpack_int32_reference

GPTQ_BITS = (2, 3, 4, 8)


class GPTQTensors(NamedTuple):
    """The four stored tensors of one GPTQ-quantized linear layer (see the module docstring).

    Attributes:
        qweight: int32 ``[in * bits / 32, out]``.
        qzeros: int32 ``[n_groups, out * bits / 32]`` (zero - 1, packed).
        scales: fp16 ``[n_groups, out]``.
        g_idx: int32 ``[in]``.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that ``n`` codes of ``bits`` bits fill.

    Raises:
        ValueError: for unsupported ``bits`` or an ``n`` that does not fill whole words.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    multiple = 32 if bits == 3 else 32 // bits
    if n % multiple:
        raise ValueError(
            f"{n} features do not pack into int32 at {bits} bits (need a multiple of {multiple})"
        )
    return n * bits // 32


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``g_idx`` without act-order: ``c // group_size`` (``group_size = -1``: all zeros)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // size


def n_groups(in_features: int, group_size: int) -> int:
    """``ceil(in / group_size)``, 1 for ``group_size = -1`` (the rows of scales and qzeros)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into int32 words along ``dim`` (see module doc).

    Args:
        codes: integer tensor; ``codes.shape[dim]`` a multiple of ``32 / bits`` (32 for 3 bits).
        bits: 2, 3, 4 or 8.
        dim: the dimension to pack.

    Returns:
        int32 tensor, ``codes``' shape with ``n * bits / 32`` along ``dim``.

    Raises:
        ValueError: for codes outside ``[0, 2**bits)`` or a length that does not pack.
    """
    n = codes.shape[dim]
    length = packed_length(n, bits)
    c = codes.movedim(dim, 0).long()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    start = torch.arange(n, device=c.device) * bits
    index, shift = start // 32, start % 32
    words = torch.zeros((length, *c.shape[1:]), dtype=torch.int64, device=c.device)
    view = (-1, *([1] * (c.dim() - 1)))
    # Bit ranges never overlap, so adding is OR-ing (and index_add_ handles repeated words).
    words.index_add_(0, index, (c << shift.view(view)) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if bool(spill.any()):  # 3 bits: the high part of a straddling code opens the next word
        words.index_add_(0, index[spill] + 1, c[spill] >> (32 - shift[spill]).view(view))
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return signed.to(torch.int32).movedim(0, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int64 codes, ``n`` along ``dim``."""
    return unpack_int32_reference(packed, bits, dim, n)


def pack_gptq(
    intweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> GPTQTensors:
    """Storage tensors from integer codes: the inverse of :func:`unpack_gptq`.

    Args:
        intweight: integer codes ``q [out, in]`` in ``[0, 2**bits)`` (``nn.Linear`` layout),
            e.g. ``clamp(round(W / s) + z, 0, 2**bits - 1)``.
        zeros: the TRUE integer zero points ``z [n_groups, out]`` in ``[0, 2**bits)`` (the v1
            minus-one is applied here; keep ``z >= 1`` for readers that do not mask, see the
            module docstring).
        scales: ``[n_groups, out]``, stored as fp16.
        g_idx: int ``[in]``, the group of each input column (any order: act-order).
        bits: 2, 3, 4 or 8.

    Returns:
        :class:`GPTQTensors` on ``intweight``'s device.

    Raises:
        ValueError: on inconsistent shapes, out-of-range codes or group indices.
    """
    out_features, in_features = intweight.shape
    groups = scales.shape[0]
    if zeros.shape != (groups, out_features) or scales.shape != (groups, out_features):
        raise ValueError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must "
            f"both be [n_groups, out={out_features}]"
        )
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx must be [in={in_features}], got {tuple(g_idx.shape)}")
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx values must lie in [0, n_groups={groups})")
    stored_zeros = (zeros.long() - 1) & ((1 << bits) - 1)
    return GPTQTensors(
        qweight=pack_int32(intweight.t(), bits, dim=0),
        qzeros=pack_int32(stored_zeros, bits, dim=1),
        scales=scales.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
    )


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(intweight [out, in], zeros [n_groups, out])`` as int64, zeros with the v1 +1 undone."""
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    intweight = unpack_int32(qweight, bits, 0, in_features).t()
    zeros = (unpack_int32(qzeros, bits, 1, out_features) + 1) & ((1 << bits) - 1)
    return intweight, zeros


def check_gptq_shapes(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> tuple[int, int]:
    """Validate the four tensors against each other; returns ``(out_features, in_features)``.

    Raises:
        ValueError: naming the first inconsistent tensor.
    """
    packed_length(32, bits)  # validates bits
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    expected = {
        "qzeros": (tuple(qzeros.shape), (groups, packed_length(out_features, bits))),
        "scales": (tuple(scales.shape), (groups, out_features)),
        "g_idx": (tuple(g_idx.shape), (in_features,)),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(
                f"GPTQ {name} has shape {got}, expected {want} for qweight "
                f"{tuple(qweight.shape)} at {bits} bits"
            )
    return out_features, in_features


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eager dequantization to ``W [out, in]`` (fp32 arithmetic, cast to ``dtype``, default the
    scales' dtype). The reference of the Triton kernel in ``ops.gptq``.

    Raises:
        ValueError: on inconsistent shapes (:func:`check_gptq_shapes`).
    """
    check_gptq_shapes(qweight, qzeros, scales, g_idx, bits)
    return dequantize_gptq_reference(qweight, qzeros, scales, g_idx, bits, dtype)
