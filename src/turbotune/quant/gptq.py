"""GPTQ: one linear layer quantized with second-order error compensation, and its RTN baseline.

Design note (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022). For a weight ``W [out, in]`` and calibration inputs ``X``, GPTQ
minimises ``||W X - Q X||^2`` column by column: each column is rounded, and its rounding error,
scaled by the inverse Hessian ``H^-1`` of that loss (``H = 2 X^T X``), is pushed onto the columns
not yet quantized, which absorb it. The pieces, in the order they run:

* The Hessian is accumulated in fp32 as a running mean over calibration tokens
  (:class:`HessianAccumulator`); inputs never need to be kept.
* Dead columns (an input channel that is always zero, ``H_jj = 0``) carry no information: their
  weights are set to zero and ``H_jj`` to one so the factorisation exists.
* Damping adds ``percdamp * mean(diag H)`` to the diagonal: calibration sets are small and
  ``X^T X`` is often singular or ill-conditioned.
* ``H^-1`` comes from a Cholesky factorisation; its upper Cholesky factor holds, row by row, the
  update of the remaining columns after each one is fixed (the paper's Cholesky reformulation,
  numerically stable where repeated rank-one downdates of ``H^-1`` are not).
* Columns are processed in blocks of 128: inside a block errors propagate eagerly, to the rest
  of the matrix once per block as one matmul (the paper's "lazy batch" updates), which is what
  makes the algorithm run at matmul speed.
* Act-order (``desc_act``) processes columns in decreasing ``H_jj`` (most activated first), so
  the hardest columns are rounded while many others can still compensate. Groups are then
  formed in that order and ``g_idx[j]`` names the group of input column ``j``: the layout of the
  standard GPTQ checkpoint format.
* Scales are rounded to fp16 *while* quantizing, because the checkpoint stores fp16 scales: the
  error compensation then sees exactly the values that will be used.
* Asymmetric zero points are kept in ``[1, 2^bits - 1]``: the v1 checkpoint format stores
  ``zero - 1`` in ``bits`` bits and cannot hold 0 (the rare all-non-negative group gets a
  slightly larger scale instead).

:func:`rtn_quantize` rounds to nearest with the same groups and the same quantizer: the
baseline GPTQ must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "GPTQSpec",
    "HessianAccumulator",
    "QuantizedWeight",
    "gptq_quantize",
    "rtn_quantize",
]

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GPTQSpec:
    """How to quantize.

    Attributes:
        bits: bits per weight, one of 2, 3, 4, 8.
        group_size: input columns per group of (scale, zero); ``-1``: one group per output row.
        sym: symmetric quantization (zero fixed at ``2^(bits-1)``).
        desc_act: act-order: quantize columns by decreasing Hessian diagonal.
        percdamp: damping, as a fraction of the mean Hessian diagonal.
        block_size: columns per lazy-batch block.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


class QuantizedWeight(NamedTuple):
    """A quantized ``[out, in]`` weight in the terms of the GPTQ format, before packing.

    Attributes:
        codes: ``[out, in]`` uint8 integer codes in ``[0, 2^bits - 1]``, original column order.
        scales: ``[groups, out]`` fp16 scales.
        zeros: ``[groups, out]`` int32 zero points (the real zero, not v1's ``zero - 1``).
        g_idx: ``[in]`` int32 group of each input column.
        bits: bits per code.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale[g] * (code - zero[g])`` per element: ``[out, in]`` in ``dtype``."""
        g = self.g_idx.long()
        scales = self.scales.float()[g].t()  # [out, in]
        zeros = self.zeros.float()[g].t()
        return (scales * (self.codes.float() - zeros)).to(dtype)


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over calibration tokens, in fp32.

    Args:
        in_features: width of the inputs.
        device: where ``H`` lives (the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs ``[..., in]`` (every leading dimension counts as tokens)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # A running mean keeps H at the scale of one token however many are seen (fp32-safe).
        total = self.tokens + n
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total


# --- the quantizer ------------------------------------------------------------------------------


def _group_params(w: torch.Tensor, spec: GPTQSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the columns ``w [out, k]``: fp32 ``[out]`` each.

    The range always includes 0 (so an all-positive row still maps 0 exactly). Scales are
    rounded to fp16, the precision the checkpoint keeps.
    """
    maxq = spec.maxq
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        # v1 checkpoints store zero - 1: zero 0 is not representable; spread [0, xmax] over
        # codes 1..maxq instead.
        low = zero < 1
        scale = torch.where(low, xmax / (maxq - 1), scale)
        zero = zero.clamp(1, maxq)
    scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)
    return scale, zero


def _quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, dequantized)`` of ``w [out]`` (or ``[out, k]`` with ``[out, 1]`` params)."""
    codes = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return codes, scale * (codes - zero)


# --- GPTQ ---------------------------------------------------------------------------------------


def _prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns zeroed, damping added; returns ``(W fp32, H fp32)`` copies."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    return w, h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (row ``i``: how fixing column ``i`` moves the rest)."""
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


def _group_order(in_features: int, spec: GPTQSpec, perm: torch.Tensor | None) -> torch.Tensor:
    """``g_idx [in]``: groups follow the processing order (permuted under act-order)."""
    size = spec.group_size if spec.group_size != -1 else in_features
    position = torch.arange(in_features, dtype=torch.int32)
    g_idx = torch.empty_like(position)
    if perm is None:
        return position // size
    g_idx[perm.cpu()] = position // size
    return g_idx


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: GPTQSpec
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Quantize ``weight`` with GPTQ.

    Args:
        weight: ``[out, in]`` dense weight (any float dtype, any device).
        hessian: ``[in, in]`` from :class:`HessianAccumulator` (``2/n X^T X``).
        spec: bits, groups, symmetry, act-order, damping.

    Returns:
        ``(quantized, dequantized)``: the codes with their scales, zeros and ``g_idx`` (on the
        CPU), and the ``[out, in]`` fp32 weight they stand for (on ``weight``'s device).

    Raises:
        torch.linalg.LinAlgError: the damped Hessian is not positive definite (raise percdamp).
    """
    w, h = _prepare_hessian(weight, hessian, spec.percdamp)
    out_features, in_features = w.shape
    perm = None
    if spec.desc_act:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h_inv = _inverse_cholesky(h)
    del h
    group = spec.group_size if spec.group_size != -1 else in_features
    n_groups = -(-in_features // group)
    scales = torch.empty(n_groups, out_features, device=w.device)
    zeros = torch.empty(n_groups, out_features, device=w.device)
    codes = torch.empty_like(w)
    deq = torch.empty_like(w)
    for i1 in range(0, in_features, spec.block_size):
        i2 = min(i1 + spec.block_size, in_features)
        _quantize_block(w, h_inv, i1, i2, group, spec, (codes, deq, scales, zeros))
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
    q = QuantizedWeight(
        codes=codes.to(torch.uint8).cpu(),
        scales=scales.half().cpu(),
        zeros=zeros.to(torch.int32).cpu(),
        g_idx=_group_order(in_features, spec, perm),
        bits=spec.bits,
    )
    return q, deq


def _quantize_block(
    w: torch.Tensor,
    h_inv: torch.Tensor,
    i1: int,
    i2: int,
    group: int,
    spec: GPTQSpec,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Columns ``[i1, i2)``: eager error propagation inside, one lazy update of the rest."""
    codes, deq, scales, zeros = outs
    block = w[:, i1:i2].clone()
    errors = torch.empty_like(block)
    h_block = h_inv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        if col % group == 0:
            # The group's range is read from the columns as updated so far (this block's
            # eager updates included), the best estimate of what will be rounded.
            ahead = torch.cat([block[:, i:], w[:, i2:]], dim=1)[:, :group]
            scale, zero = _group_params(ahead, spec)
            scales[col // group], zeros[col // group] = scale, zero
        else:  # a group begun in an earlier block
            scale, zero = scales[col // group], zeros[col // group]
        c, q = _quantize_column(block[:, i], scale, zero, spec.maxq)
        codes[:, col], deq[:, col] = c, q
        err = (block[:, i] - q) / h_block[i, i]
        block[:, i:].sub_(err.unsqueeze(1) * h_block[i, i:].unsqueeze(0))
        errors[:, i] = err
    w[:, i2:].sub_(errors @ h_inv[i1:i2, i2:])


# --- round to nearest ---------------------------------------------------------------------------


def rtn_quantize(weight: torch.Tensor, spec: GPTQSpec) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round to nearest with GPTQ's groups and quantizer (no act-order, no error feedback).

    Args:
        weight: ``[out, in]`` dense weight.
        spec: bits, group size, symmetry (``desc_act`` and damping are ignored).

    Returns:
        ``(quantized, dequantized)`` as :func:`gptq_quantize`.
    """
    w = weight.detach().to(torch.float32)
    in_features = w.shape[1]
    group = spec.group_size if spec.group_size != -1 else in_features
    codes, deq = torch.empty_like(w), torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, in_features, group):
        cols = w[:, start : start + group]
        scale, zero = _group_params(cols, spec)
        c, q = _quantize_column(cols, scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq)
        codes[:, start : start + group], deq[:, start : start + group] = c, q
        scales.append(scale)
        zeros.append(zero)
    q = QuantizedWeight(
        codes=codes.to(torch.uint8).cpu(),
        scales=torch.stack(scales).half().cpu(),
        zeros=torch.stack(zeros).to(torch.int32).cpu(),
        g_idx=_group_order(in_features, spec, None),
        bits=spec.bits,
    )
    return q, deq
