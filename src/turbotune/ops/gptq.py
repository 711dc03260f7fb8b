"""GPTQ weights in matmuls: Triton dequantization and dequantize-and-multiply kernels.

Design note. A GPTQ base layer (storage layout: ``quant.gptq_format``) computes the forward
``y = x W^T`` and, for training, the input gradient ``dx = dy W``; ``W`` is never kept dense
between the two. Two strategies, picked per call by the number of rows ``M`` of ``x``/``dy``:

- ``M > FUSED_MAX_ROWS`` (training: thousands of tokens): dequantize ``W`` into a bf16/fp16
  buffer with :func:`gptq_dequantize` (one pass: read ``bits/8`` bytes, write 2 bytes per
  weight) and hand the matmul to cuBLAS. At 4096 x 14336 the extra pass moves ~0.25 GB
  (estimated ~0.1 ms on an H100) against ~0.6 ms of tensor-core matmul at 4096 tokens, and a
  Triton GEMM with dequantization in its inner loop is not reliably faster than cuBLAS there.
- ``M <= FUSED_MAX_ROWS`` (evaluation, generation, tiny batches): the matmul is bound by reading
  ``W``; the fused kernels read the packed words (4 bits = a quarter of bf16's bytes) and
  dequantize tiles in registers right before ``tl.dot``, never writing ``W``. With few row
  blocks and a narrow output the reduction is split over programs (fp32 atomic partial sums)
  so that every SM streams part of ``W``.

The storage layout makes both fused directions cheap: ``qweight [in * bits / 32, out]`` is
already a ``W^T`` tile source for ``x W^T`` (tiles ``[BLOCK_K, BLOCK_N]``) and is transposed in
registers for ``dy W``. Act-order is free: scales and zeros are gathered through ``g_idx`` per
input row, whatever its order. Dequantization is ``(q - z) * s`` in fp32 rounded once to the
output dtype: bit-identical to ``ops.reference.dequantize_gptq_reference``.

Fused tiles hold at most 128 rows (more rows: more row blocks). The config (tiles, pipeline
stages) is the largest whose shared-memory bound (:func:`shared_bytes_bound`, checked against
sm_90 / sm_80 compiles in the tests) fits the device; a launch that still raises
``OutOfResources`` retries smaller configs and remembers the one that runs.

Formulas (``g = g_idx[k]``, ``z = (stored_zero + 1) mod 2**bits``)::

    W[n, k] = s[g, n] * (q[k, n] - z[g, n])      y = x W^T (+ b)      dx = dy W
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from turbotune.ops._triton import interpreting, num_programs_hint, tl, triton, use_triton
from turbotune.ops.reference import dequantize_gptq_reference

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: the fused kernels never launch

    class OutOfResources(Exception):  # Triton's name
        """Stand-in for Triton's error when Triton is absent."""


__all__ = [
    "A100_MAX_SHARED",
    "FUSED_MAX_ROWS",
    "FusedConfig",
    "FusedPlan",
    "GPTQLinearFunction",
    "fused_config",
    "fused_plan",
    "gptq_dequantize",
    "gptq_forward",
    "gptq_input_grad",
    "gptq_linear",
    "max_shared_memory",
    "shared_bytes_bound",
]

# Largest number of rows (tokens) that takes the fused kernels; above it, dequantize + cuBLAS.
# Where the crossover lies depends on the GPU: benchmarks/gptq_kernels.py measures it, and
# TURBOTUNE_GPTQ_FUSED_MAX_ROWS overrides it (0: always dequantize + cuBLAS).
FUSED_MAX_ROWS = int(os.environ.get("TURBOTUNE_GPTQ_FUSED_MAX_ROWS", "64"))
_DEQUANT_BLOCK = 64  # a 64 x 64 tile per program: 128-byte rows written, 256-byte rows read
# Fused kernel tiles: at most 128 rows per program (more rows: more row blocks), 3 pipeline
# stages (Triton's default on sm_80/sm_90). Shared memory per block: A100 164 KiB (the default
# where the device cannot be asked), H100 227 KiB.
_MAX_BLOCK_M = 128
_NUM_STAGES = 3
A100_MAX_SHARED = 166912
_MAX_SHARED: dict[int, int] = {}  # device index -> max shared memory per block
_CONFIGS: dict[tuple, FusedConfig] = {}  # (device, dtype, bits, transpose, row block) -> config


@triton.jit
def _unpack(ptrs, next_word, shift, mask, BITS: tl.constexpr):
    """Codes at bit ``shift`` of the int32 words at ``ptrs``; for 3 bits a code that crosses
    into the next word (``next_word`` elements further) takes its high bits from there."""
    shift = shift.to(tl.uint32)
    words = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)  # logical shifts
    codes = words >> shift
    if BITS == 3:
        spill = shift > 29
        high = tl.load(ptrs + next_word, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        codes = codes | (high << tl.where(spill, 32 - shift, 0))  # high is 0 where no spill
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _weight_tile(
    qweight_ptr, qzeros_ptr, scales_ptr, g, offs_k, offs_n, mask,
    stride_qw, stride_qz, stride_s, BITS: tl.constexpr,
):  # fmt: skip
    """fp32 tile ``W^T[k, n] = s[g, n] * (q[k, n] - z[g, n])`` of shape ``[BLOCK_K, BLOCK_N]``
    (``g = g_idx[offs_k]``, already loaded); zero where ``mask`` is off."""
    bit_k = offs_k * BITS
    w_ptrs = qweight_ptr + (bit_k // 32)[:, None].to(tl.int64) * stride_qw + offs_n[None, :]
    q = _unpack(w_ptrs, stride_qw, (bit_k % 32)[:, None], mask, BITS)
    bit_n = offs_n * BITS
    g64 = g.to(tl.int64)[:, None]
    z_ptrs = qzeros_ptr + g64 * stride_qz + (bit_n // 32)[None, :]
    z = (_unpack(z_ptrs, 1, (bit_n % 32)[None, :], mask, BITS) + 1) & ((1 << BITS) - 1)
    s = tl.load(scales_ptr + g64 * stride_s + offs_n[None, :], mask=mask, other=0.0)
    return (q - z).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _dequant_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N,
    stride_qw, stride_qz, stride_s, stride_out,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``out[n, k] = W[n, k]``: program ``(i, j)`` writes outputs ``i * BLOCK_N ...`` x inputs
    ``j * BLOCK_K ...`` (``out`` rows may be strided: a block of a wider buffer)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
    w = _weight_tile(
        qweight_ptr, qzeros_ptr, scales_ptr, g, offs_k, offs_n, mask,
        stride_qw, stride_qz, stride_s, BITS,
    )  # fmt: skip
    out_ptrs = out_ptr + offs_n[None, :].to(tl.int64) * stride_out + offs_k[:, None]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, c_ptr, M, N, K, split_len,
    stride_am, stride_cm, stride_qw, stride_qz, stride_s,
    TRANSPOSE: tl.constexpr, BITS: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``TRANSPOSE=False``: ``c = a W^T`` (``a [M, K]``, ``c [M, N]``, loop over ``K``).
    ``TRANSPOSE=True``: ``c = a W`` (``a [M, N]``, ``c [M, K]``, loop over ``N``).

    W tiles are dequantized to ``a``'s dtype in registers; products accumulate in fp32.
    Split reduction: program ``(i, j, s)`` sums the loop range ``[s * split_len, (s + 1) *
    split_len)`` only; with ``SPLIT`` the partial sums are added atomically into an fp32 ``c``
    (few rows and a narrow output would otherwise leave most SMs idle). ``DOT_FP32`` feeds ``tl.dot`` the same (rounded) values as fp32: the Triton interpreter's
    bf16 ``tl.dot`` returns garbage (Triton 3.9), its fp32 one is exact.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if TRANSPOSE:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        n_start = tl.program_id(2) * split_len
        for n0 in range(n_start, tl.minimum(n_start + split_len, N), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :]
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = _weight_tile(
                qweight_ptr, qzeros_ptr, scales_ptr, g, offs_k, offs_n,
                mask_k[:, None] & mask_n[None, :], stride_qw, stride_qz, stride_s, BITS,
            )  # fmt: skip
            w = w.to(a.dtype)
            if DOT_FP32:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, tl.trans(w))
        offs_c = offs_k
        mask_c = mask_k
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_start = tl.program_id(2) * split_len
        for k0 in range(k_start, tl.minimum(k_start + split_len, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            w = _weight_tile(
                qweight_ptr, qzeros_ptr, scales_ptr, g, offs_k, offs_n,
                mask_k[:, None] & mask_n[None, :], stride_qw, stride_qz, stride_s, BITS,
            )  # fmt: skip
            w = w.to(a.dtype)
            if DOT_FP32:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w)
        offs_c = offs_n
        mask_c = mask_n
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_c[None, :]
    c_mask = mask_m[:, None] & mask_c[None, :]
    if SPLIT:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---- launchers ----


def _shape(storage: Sequence[torch.Tensor], bits: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of the storage ``(qweight, qzeros, scales, g_idx)``."""
    qweight = storage[0]
    return qweight.shape[1], qweight.shape[0] * 32 // bits


def _strides(storage: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    qweight, qzeros, scales, g_idx = storage
    if qweight.stride(1) != 1 or qzeros.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("GPTQ qweight, qzeros and scales need unit column stride")
    if not g_idx.is_contiguous():
        raise ValueError("GPTQ g_idx must be contiguous")
    return qweight.stride(0), qzeros.stride(0), scales.stride(0)


def _dequantize_launch(
    storage: Sequence[torch.Tensor], bits: int, out: torch.Tensor
) -> torch.Tensor:
    n_out, n_in = out.shape
    grid = (triton.cdiv(n_out, _DEQUANT_BLOCK), triton.cdiv(n_in, _DEQUANT_BLOCK))
    if out.numel():
        _dequant_kernel[grid](
            *storage, out, n_in, n_out, *_strides(storage), out.stride(0),
            BITS=bits, BLOCK_K=_DEQUANT_BLOCK, BLOCK_N=_DEQUANT_BLOCK,
        )  # fmt: skip
    return out


def _split(loop_len: int, block: int, programs: int, sms: int) -> int:
    """Ways to split the reduction loop: enough programs for two per SM, each still running
    at least 4 blocks of the loop."""
    return max(1, min(2 * sms // max(programs, 1), loop_len // (4 * block)))


class FusedConfig(NamedTuple):
    """Compile-time launch parameters of ``_matmul_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class FusedPlan(NamedTuple):
    """One launch: its config, grid ``(row blocks, column blocks, splits)`` and the reduction
    length of each split (a multiple of the loop block)."""

    config: FusedConfig
    grid: tuple[int, int, int]
    split_len: int


def _row_block(rows: int) -> int:
    """Rows per program: all of them up to ``_MAX_BLOCK_M`` (``tl.dot`` needs 16 or more); more
    rows take more row blocks, never a bigger tile (4096 rows in one tile wanted 1 MB of shared
    memory)."""
    return min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))


def _candidates(rows: int, transpose: bool) -> list[FusedConfig]:
    """Configs from the fastest to the smallest: fewer stages first, then halved row blocks."""
    block_n, block_k = (64, 32) if transpose else (32, 64)
    out, block_m = [], _row_block(rows)
    while block_m >= 16:
        out += [FusedConfig(block_m, block_n, block_k, 4, st) for st in (_NUM_STAGES, 2, 1)]
        block_m //= 2
    return out


def shared_bytes_bound(config: FusedConfig, transpose: bool, element_size: int = 2) -> int:
    """Upper bound of the shared memory ``_matmul_kernel`` needs with ``config``.

    Per pipeline stage: the ``a`` tile, and per weight of the ``W`` tile its qweight and qzeros
    words, its fp16 scale and the dequantized value (what the software pipeliner may buffer);
    plus the fp32 accumulator once (layout conversion in the epilogue). Triton 3.9 needs about
    a quarter of this and Triton 3.6 at most half (1 MB at 4096 rows, where the bound says
    2.7 MB); tests/ops/test_gptq.py checks the bound against sm_90 / sm_80 compiles.
    """
    block_col, block_loop = (
        (config.block_k, config.block_n) if transpose else (config.block_n, config.block_k)
    )
    weight_bytes = config.block_n * config.block_k * (4 + 4 + 2 + element_size)
    stage = config.block_m * block_loop * element_size + weight_bytes
    return config.num_stages * stage + config.block_m * block_col * 4


def fused_config(
    rows: int, transpose: bool, max_shared: int = A100_MAX_SHARED, element_size: int = 2
) -> FusedConfig:
    """The config the fused kernel starts with for ``rows`` rows: the first of
    :func:`_candidates` whose :func:`shared_bytes_bound` fits ``max_shared`` bytes."""
    return _fitting(rows, transpose, max_shared, element_size)[0]


def _fitting(rows: int, transpose: bool, max_shared: int, element_size: int) -> list[FusedConfig]:
    candidates = _candidates(rows, transpose)
    fits = [c for c in candidates if shared_bytes_bound(c, transpose, element_size) <= max_shared]
    return fits or candidates[-1:]  # nothing provably fits: the smallest, and let it try


def fused_plan(
    rows: int,
    columns: int,
    loop_len: int,
    config: FusedConfig,
    transpose: bool,
    sms: int,
    split: int | None = None,
) -> FusedPlan:
    """Grid and split of one fused launch (``columns``: outputs per row, ``loop_len``: the
    reduction length); ``split`` defaults to :func:`_split` for ``sms`` streaming processors."""
    block_col, block_loop = (
        (config.block_k, config.block_n) if transpose else (config.block_n, config.block_k)
    )
    grid_mc = (triton.cdiv(rows, config.block_m), triton.cdiv(columns, block_col))
    if split is None:
        split = _split(loop_len, block_loop, grid_mc[0] * grid_mc[1], sms)
    split_len = triton.cdiv(triton.cdiv(loop_len, split), block_loop) * block_loop
    return FusedPlan(config, (*grid_mc, triton.cdiv(loop_len, split_len)), split_len)


def max_shared_memory(device: torch.device) -> int:
    """Shared memory per block (bytes, opt-in maximum) of ``device``; the A100's where it cannot
    be asked (CPU, interpreter)."""
    if device.type != "cuda" or interpreting():
        return A100_MAX_SHARED
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _MAX_SHARED:
        try:
            props = triton.runtime.driver.active.utils.get_device_properties(index)
            _MAX_SHARED[index] = int(props["max_shared_mem"])
        except Exception:  # any driver trouble: stay conservative
            _MAX_SHARED[index] = A100_MAX_SHARED
    return _MAX_SHARED[index]


def _fused_run(
    a: torch.Tensor,
    storage: Sequence[torch.Tensor],
    bits: int,
    transpose: bool,
    config: FusedConfig,
    split: int | None,
) -> torch.Tensor:
    n_out, n_in = _shape(storage, bits)
    m = a.shape[0]
    columns, loop_len = (n_in, n_out) if transpose else (n_out, n_in)
    plan = fused_plan(m, columns, loop_len, config, transpose, num_programs_hint(a.device), split)
    atomic = plan.grid[2] > 1
    c = torch.empty((m, columns), dtype=a.dtype, device=a.device)
    target = torch.zeros((m, columns), dtype=torch.float32, device=a.device) if atomic else c
    _matmul_kernel[plan.grid](
        a, *storage, target, m, n_out, n_in, plan.split_len, a.stride(0), target.stride(0),
        *_strides(storage), TRANSPOSE=transpose, BITS=bits, DOT_FP32=interpreting(),
        SPLIT=atomic, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return c.copy_(target) if atomic else c


def _fused_launch(
    a: torch.Tensor,
    storage: Sequence[torch.Tensor],
    bits: int,
    transpose: bool,
    split: int | None = None,
) -> torch.Tensor:
    """``a W^T`` (or ``a W`` when ``transpose``) by the fused kernel; ``a`` is ``[M, *]``.

    ``split`` (default: :func:`_split`) divides the reduction among programs; above 1 the
    partial sums meet in an fp32 buffer by atomic adds (not bitwise run-to-run reproducible).
    The config is the first of :func:`_candidates` that fits the device's shared memory by
    :func:`shared_bytes_bound`; should the compiler still report ``OutOfResources``, the next
    smaller one is tried, the one that works is remembered per (device, dtype, bits,
    direction, row block), and if none works ``W`` is dequantized and cuBLAS multiplies.
    """
    n_out, n_in = _shape(storage, bits)
    a = a if a.stride(-1) == 1 else a.contiguous()
    m = a.shape[0]
    columns, loop_len = (n_in, n_out) if transpose else (n_out, n_in)
    if m * columns == 0 or loop_len == 0:
        return torch.zeros((m, columns), dtype=a.dtype, device=a.device)
    key = (a.device, a.dtype, bits, transpose, _row_block(m))
    tries = _fitting(m, transpose, max_shared_memory(a.device), a.element_size())
    if key in _CONFIGS:
        tries = tries[tries.index(_CONFIGS[key]) :] if _CONFIGS[key] in tries else tries
    for config in tries:
        try:
            c = _fused_run(a, storage, bits, transpose, config, split)
        except OutOfResources:
            continue
        _CONFIGS[key] = config
        return c
    warnings.warn(
        f"GPTQ fused kernel: no config fits this GPU for {m} rows; dequantize + matmul instead",
        RuntimeWarning,
        stacklevel=2,
    )
    w = gptq_dequantize(storage, bits, a.dtype)
    return a @ w if transpose else F.linear(a, w)


def _fused(a: torch.Tensor, storage: Sequence[torch.Tensor]) -> bool:
    return (
        a.shape[0] <= FUSED_MAX_ROWS
        and a.dtype in (torch.float16, torch.bfloat16)
        and use_triton(a, storage[0])
    )


# ---- functional entries ----


def gptq_dequantize(
    storage: Sequence[torch.Tensor],
    bits: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``W [out_features, in_features]`` in ``dtype`` from GPTQ storage.

    Args:
        storage: ``(qweight, qzeros, scales, g_idx)`` (see ``quant.gptq_format``).
        bits: 2, 3, 4 or 8.
        dtype: output dtype (bf16, fp16 or fp32; arithmetic is fp32 either way).
        out: optional ``[out, in]`` tensor with unit column stride to write into (e.g. a row
            or column block of a stacked buffer); its dtype wins.

    Returns:
        ``[out, in]`` (``out`` when given).
    """
    shape = _shape(storage, bits)
    if out is not None and (tuple(out.shape) != shape or out.stride(-1) != 1):
        raise ValueError(f"out must be {shape} with unit column stride, got {tuple(out.shape)}")
    if not use_triton(storage[0]):
        dense = dequantize_gptq_reference(*storage, bits, dtype if out is None else out.dtype)
        return dense if out is None else out.copy_(dense)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=storage[0].device)
    return _dequantize_launch(storage, bits, out)


def gptq_forward(
    x: torch.Tensor,
    storage: Sequence[torch.Tensor],
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias`` for ``x [M, in]`` (no autograd): fused for few rows, else dequantize +
    cuBLAS (the bias then rides in the GEMM's epilogue, as ``F.linear`` adds it)."""
    bias = None if bias is None else bias.to(x.dtype)
    if _fused(x, storage):
        y = _fused_launch(x, storage, bits, transpose=False)
        return y if bias is None else y.add_(bias)
    return F.linear(x, gptq_dequantize(storage, bits, x.dtype), bias)


def gptq_input_grad(dy: torch.Tensor, storage: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """``dy W`` for ``dy [M, out]`` (no autograd): the input gradient of ``x W^T``."""
    if _fused(dy, storage):
        return _fused_launch(dy, storage, bits, transpose=True)
    return dy @ gptq_dequantize(storage, bits, dy.dtype)


class GPTQLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` saving only the packed storage; backward re-dequantizes ``W``."""

    @staticmethod
    def forward(ctx, x, bias, bits, qweight, qzeros, scales, g_idx):
        storage = (qweight, qzeros, scales, g_idx)
        y = gptq_forward(x, storage, bits, bias)
        ctx.bits, ctx.bias_dtype = bits, None if bias is None else bias.dtype
        ctx.save_for_backward(*storage)
        return y

    @staticmethod
    def backward(ctx, dy):
        storage = ctx.saved_tensors
        dx = gptq_input_grad(dy, storage, ctx.bits) if ctx.needs_input_grad[0] else None
        d_bias = dy.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return dx, d_bias, None, None, None, None, None


def gptq_linear(
    x: torch.Tensor,
    storage: Sequence[torch.Tensor],
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + bias`` with ``W`` from GPTQ storage, differentiable in ``x`` (and ``bias``).

    Computes in ``x``'s dtype (bf16, fp16 or fp32; under autocast, the autocast dtype); the
    fp16 scales are read as they are, no fp16 compute is forced.

    Args:
        x: ``[..., in]``.
        storage: ``(qweight, qzeros, scales, g_idx)``.
        bits: 2, 3, 4 or 8.
        bias: optional ``[out]``.

    Returns:
        ``[..., out]``.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x2 = x.reshape(-1, x.shape[-1])
    ctx = torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
    with ctx:
        y = GPTQLinearFunction.apply(x2, bias, bits, *storage)
    # No view for 2-D inputs: FSDP2 warns about (and cannot hook in-place ops on) view outputs.
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
