"""Matrix products with one tiny dimension (the LoRA rank), at memory speed.

Design note. A LoRA adapter of rank ``r`` turns into products where one side is ``r`` (16-64)
wide and the other is a whole activation: ``t = x A^T`` (``[M, r]`` from ``[M, K]``), ``g = dy B``
and the weight gradients ``dA = g^T x``, ``dB = dy^T t`` (reductions over the ``M`` tokens).
Their FLOPs are nothing; their cost is one read of the activation (32-117 MB per product at
Llama-8B shape and 4096 tokens). cuBLAS tiles such products with tiles of 128-256 rows, so the
``[4096, r]`` output has 16-32 tiles and only that many of the H100's 132 SMs stream the
activation: measured at ~0.3 TB/s instead of ~3 (``benchmarks/kernel_micro.py --only skinny``).

Two Triton kernels, both reading the big operand exactly once with every SM busy:

* :func:`skinny_mm` ``out[M, N] = alpha * a[M, K] @ b[K, N]`` with ``N <= 64``: one program per
  ``BLOCK_M`` rows (32 rows: 128 programs at 4096 tokens), looping over ``K``;
* :func:`skinny_tn` ``out[R, N] = alpha * a[M, R]^T @ b[M, N]`` with ``R <= 64``: programs own a
  column block of ``b`` and a slice of the ``M`` rows (split so there are ~2 programs per SM);
  each writes an fp32 partial, and the partials are summed in fp32 (deterministic, no atomics).

Both accumulate in fp32 and round once, as cuBLAS does. Operands may have any strides (views
of stacked buffers, transposes). :func:`use_skinny` says when a product qualifies; callers keep
``torch.mm`` for everything else, and on CPU without the interpreter.
"""

from __future__ import annotations

import torch

from turbotune.ops._triton import interpreting, tl, triton, use_triton

__all__ = ["MAX_SKINNY", "skinny_mm", "skinny_tn", "use_skinny"]

# Widest "tiny" side handled (the tile is padded to a power of two >= 16).
MAX_SKINNY = 64
# Below this many rows of the big operand cuBLAS is as good (launch-bound either way).
_MIN_ROWS = 1024


@triton.jit
def _skinny_mm_kernel(
    a_ptr, b_ptr, part_ptr, M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """``part[split, rows, :] = a[rows, ks] @ b[ks, :]`` over this split's slice ``ks`` of K."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_am
    first = split * k_per_split
    last = tl.minimum(first + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + ks
        k_ok = k < last
        a = tl.load(
            a_rows + k[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        b = b.to(a.dtype)
        if DOT_FP32:  # the interpreter's 16-bit tl.dot is wrong (Triton 3.9); same values in fp32
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc += tl.dot(a, b)
    part = part_ptr + (split * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
    tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _skinny_tn_kernel(
    a_ptr, b_ptr, part_ptr, M, R, N, rows_per_split,
    stride_am, stride_ar, stride_bm, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """``part[split, :, cols] = a[rows, :]^T @ b[rows, cols]`` over this split's rows (fp32)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    ms = tl.arange(0, BLOCK_M)
    col_ok, r_ok = cols < N, rs < R
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_M):
        m = m0 + ms
        m_ok = m < last
        m64 = m.to(tl.int64)
        a = tl.load(
            a_ptr + m64[:, None] * stride_am + rs[None, :] * stride_ar,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + m64[:, None] * stride_bm + cols[None, :] * stride_bn,
            mask=m_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        a = a.to(b.dtype)
        if DOT_FP32:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32))
        else:
            acc += tl.dot(tl.trans(a), b)
    part = part_ptr + (split * R + rs[:, None]).to(tl.int64) * N + cols[None, :]
    tl.store(part, acc, mask=r_ok[:, None] & col_ok[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def use_skinny(big: torch.Tensor, tiny: int) -> bool:
    """Whether a product whose tiny side is ``tiny`` wide, over the rows of ``big``, goes here."""
    return (
        tiny <= MAX_SKINNY
        and big.shape[0] >= _MIN_ROWS
        and big.dtype in (torch.bfloat16, torch.float16)
        and use_triton(big)
    )


def _output(shape: tuple[int, int], like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the product is {shape}")
    return out


def skinny_mm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """``alpha * a @ b`` for a narrow ``b`` (split over K so that every SM streams ``a``).

    Args:
        a: ``[M, K]`` (any strides).
        b: ``[K, N]`` with ``N <= MAX_SKINNY`` (any strides; cast to ``a``'s dtype in-kernel).
        out: optional ``[M, N]`` destination (any strides, e.g. a column block).
        alpha: scale applied to the fp32 product before rounding.

    Returns:
        ``[M, N]`` in ``a``'s dtype (``out`` when given).
    """
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k or n > MAX_SKINNY:
        raise ValueError(f"skinny_mm: [{m}, {k}] @ {list(b.shape)} (N at most {MAX_SKINNY})")
    block_m, block_k = 128, 64
    row_blocks = triton.cdiv(m, block_m)
    splits = _splits(k, row_blocks, a.device, min_per_split=256)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    _skinny_mm_kernel[(row_blocks, splits)](
        a, b, part, m, n, k, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_M=block_m, BLOCK_N=_block(n), BLOCK_K=block_k, DOT_FP32=interpreting(),
        num_warps=4, num_stages=4,
    )  # fmt: skip
    return _finish(part, alpha, (m, n), a.dtype, out)


def _finish(
    part: torch.Tensor,
    alpha: float,
    shape: tuple[int, int],
    dtype: torch.dtype,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Sum the fp32 partials, scale, round once into ``out`` (or a new tensor)."""
    total = part[0] if part.shape[0] == 1 else part.sum(0)
    if alpha != 1.0:
        total.mul_(alpha)
    if out is None:
        return total.to(dtype)
    return _output(shape, total, out).copy_(total)


def _splits(length: int, blocks: int, device: torch.device, min_per_split: int = 256) -> int:
    """Splits of the reduced ``length`` so that ~2 programs run per SM, each >= ``min_per_split``."""
    sms = 8
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(blocks, 1))
    return max(1, min(want, length // min_per_split))


def skinny_tn(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None = None,
    alpha: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha * a^T @ b`` for a narrow ``a``: a reduction over the ``M`` rows of both.

    Args:
        a: ``[M, R]`` with ``R <= MAX_SKINNY`` (any strides).
        b: ``[M, N]`` (any strides).
        out: optional ``[R, N]`` destination (any strides; e.g. ``dB.t()`` for ``dy^T t``).
        alpha: scale applied to the fp32 sum before rounding.
        out_dtype: dtype of a new output (default ``b``'s); ignored when ``out`` is given.

    Returns:
        ``[R, N]`` (``out`` when given).
    """
    (m, r), n = a.shape, b.shape[1]
    if b.shape[0] != m or r > MAX_SKINNY:
        raise ValueError(
            f"skinny_tn: {list(a.shape)}^T @ [{b.shape[0]}, {n}] (R at most {MAX_SKINNY})"
        )
    block_n = 128
    col_blocks = triton.cdiv(n, block_n)
    splits = _splits(m, col_blocks, b.device)
    rows_per_split = triton.cdiv(m, splits)
    part = torch.empty((splits, r, n), dtype=torch.float32, device=b.device)
    _skinny_tn_kernel[(col_blocks, splits)](
        a, b, part, m, r, n, rows_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_M=64, BLOCK_R=_block(r), BLOCK_N=block_n, DOT_FP32=interpreting(),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return _finish(part, alpha, (r, n), out_dtype or b.dtype, out)
