"""HQQ: calibration-free half-quadratic quantization of a weight matrix, and its packed storage.

Design note (after Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models",
Mobius Labs 2023, and the ``hqq`` package; written anew here). A weight is cut into groups of
``group_size`` values; group ``k`` stores ``bits``-bit codes ``q`` with a step ``scale`` and a
zero point ``zero`` (in code units), and dequantizes as ``w_r = (q - zero) * scale``.
Round-to-nearest (RTN) takes ``scale = (max - min) / (2^bits - 1)`` and ``zero = -min / scale``.
HQQ starts there and minimises ``||W - w_r||_p^p`` with ``p < 1``, which lets a few outliers
keep large errors so that the many ordinary weights fit well. Half-quadratic splitting brings in
an error variable ``E`` and alternates three closed-form steps:

* ``E  <- shrink_p(W - w_r, beta)``: the lp proximal step
  ``sign(x) * relu(|x| - |x|^(p-1) / beta)``;
* ``zero <- mean(q - (W - E) / scale)`` over the group (the least-squares zero point for the
  fixed codes); with ``optimize_scale`` the step and the zero are fitted together by the
  per-group linear least squares of ``W - E`` on ``q`` (the same split, both parameters);
* ``beta <- kappa * beta``; then ``q = round(W / scale + zero)`` clamped to ``[0, 2^bits - 1]``.

Each group keeps the parameters of its lowest mean absolute error seen (the error ``hqq``
watches), so the result is never worse than RTN on that measure. All maths is fp32 on the
weight's device, a block of rows at a time (bounded temporaries).

Storage (see the layout note in ``ops/reference.py``): :class:`HQQWeight` holds the packed codes
(4-bit: two per byte; 8-bit: one; 1/2-bit: 8/4 per byte; 3/5/6/7-bit: 10/6/5/4 per int32), and
``scale``/``zero`` per group, every tensor with the same leading dimension so that FSDP2 can
shard them by rows. ``axis=1`` groups along ``in_features`` (rows of ``W``); ``axis=0`` along
``out_features`` (stored as ``W^T``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from turbotune.ops.reference import dequantize_hqq_reference, hqq_word_layout

__all__ = [
    "HQQParams",
    "HQQWeight",
    "pack_codes",
    "quantize",
    "quantize_codes",
    "reconstruction_error",
    "unpack_codes",
]

Method = Literal["hqq", "rtn"]


@dataclass(frozen=True)
class HQQParams:
    """Settings of the half-quadratic solver (defaults: the HQQ paper's)."""

    lp_norm: float = 0.7
    """``p`` of the error norm, in (0, 1]."""
    beta: float = 10.0
    """Initial weight of the quadratic coupling term."""
    kappa: float = 1.01
    """Growth of ``beta`` per iteration (> 1)."""
    iters: int = 20
    """Solver iterations."""
    optimize_scale: bool = False
    """Fit the step together with the zero point (per-group least squares), not the zero alone."""
    early_stop: bool = True
    """Stop once an iteration improves no group."""

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm <= 1.0:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0.0 or self.kappa <= 1.0 or self.iters < 1:
            raise ValueError("need beta > 0, kappa > 1 and iters >= 1")


class HQQWeight(NamedTuple):
    """A quantized ``[out, in]`` weight.

    Attributes:
        packed: ``[R, row_bytes]`` packed codes in a storage dtype (uint8 unless asked otherwise).
        scale: ``[R, groups]`` step per group (its dtype is the metadata dtype).
        zero: ``[R, groups]`` zero point per group, in code units.
        shape: ``(out_features, in_features)``.
        bits: bits per code.
        group_size: codes per group.
        axis: 1 (groups along ``in``, ``R = out``) or 0 (groups along ``out``, ``R = in``).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    axis: int

    def dequantize(
        self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense ``[out, in]`` in ``dtype`` (Triton where it runs; see ``ops/hqq.py``)."""
        from turbotune.ops.hqq import dequantize_hqq

        return dequantize_hqq(self, dtype, out=out)

    def dequantize_eager(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` in ``dtype`` by the eager reference."""
        return dequantize_hqq_reference(
            self.packed, self.scale, self.zero, self.shape, self.bits, self.group_size,
            self.axis, dtype,
        )  # fmt: skip


# ---- packing ----


def row_bytes(n_cols: int, bits: int) -> int:
    """Bytes of one packed row of ``n_cols`` codes (a multiple of 4, for 32-bit storage views)."""
    per_word, word_bytes = hqq_word_layout(bits)
    nbytes = math.ceil(n_cols / per_word) * word_bytes
    return -(-nbytes // 4) * 4


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, C]`` integer codes in ``[0, 2^bits)`` into ``[R, row_bytes(C, bits)]`` uint8."""
    per_word, word_bytes = hqq_word_layout(bits)
    n_rows, n_cols = codes.shape
    n_words = row_bytes(n_cols, bits) // word_bytes
    padded = torch.zeros((n_rows, n_words * per_word), dtype=torch.int32, device=codes.device)
    padded[:, :n_cols] = codes.to(torch.int32)
    shifts = torch.arange(per_word - 1, -1, -1, device=codes.device, dtype=torch.int32) * bits
    # Disjoint bit fields: the sum is the bitwise or.
    words = (padded.view(n_rows, n_words, per_word) << shifts).sum(-1, dtype=torch.int32)
    if word_bytes == 1:
        return words.to(torch.uint8)
    return words.contiguous().view(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    """The ``[R, n_cols]`` int32 codes of :func:`pack_codes` output (any storage dtype)."""
    from turbotune.ops.reference import unpack_codes_reference

    return unpack_codes_reference(packed, bits, n_cols)


# ---- the solver ----


def _stored(weight: torch.Tensor, axis: int) -> torch.Tensor:
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    return weight if axis == 1 else weight.t()


def _grouped(rows: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[R, C]`` -> fp32 ``[R, G, group_size]`` (last group zero-padded) and the valid mask."""
    n_rows, n_cols = rows.shape
    n_groups = -(-n_cols // group_size)
    pad = n_groups * group_size - n_cols
    x = rows.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(n_rows, n_groups, group_size)
    if not pad:
        return x, None
    valid = torch.ones(n_groups * group_size, dtype=torch.bool, device=rows.device)
    valid[n_cols:] = False
    return x, valid.reshape(n_groups, group_size)


def _mean(t: torch.Tensor, valid: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
    """Mean over the group (last) dimension, ignoring padding; keeps the dimension."""
    if valid is None:
        return t.mean(-1, keepdim=True)
    return torch.where(valid, t, 0.0).sum(-1, keepdim=True) / count


def _minmax_init(
    x: torch.Tensor, valid: torch.Tensor | None, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's ``(inverse step, zero)``: the group's ``[min, max]`` onto ``[0, qmax]``."""
    lo = x if valid is None else torch.where(valid, x, math.inf)
    hi = x if valid is None else torch.where(valid, x, -math.inf)
    w_min, w_max = lo.amin(-1, keepdim=True), hi.amax(-1, keepdim=True)
    # A flat group would divide by zero; any finite step reproduces its one value.
    span = (w_max - w_min).clamp_min(torch.finfo(torch.float32).tiny * qmax)
    inv = (qmax / span).clamp_max(1e30)
    return inv, -w_min * inv


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The lp proximal operator ``sign(x) relu(|x| - |x|^(p-1) / beta)`` (soft threshold at p=1)."""
    a = x.abs()
    thresh = 1.0 / beta if p == 1.0 else a.pow(p - 1.0) / beta
    return torch.sign(x) * (a - thresh).clamp_min(0.0)


def _fit_scale_zero(
    q: torch.Tensor, target: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, valid, count
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``target ~ a q + c`` per group -> ``(1/a, -c/a)``; keeps the old pair where
    the fit is degenerate (one distinct code) or not a positive step."""
    q_mean, t_mean = _mean(q, valid, count), _mean(target, valid, count)
    dq = q - q_mean
    var = _mean(dq * dq, valid, count)
    cov = _mean(dq * (target - t_mean), valid, count)
    a = cov / var.clamp_min(1e-12)
    ok = (var > 1e-12) & (a > 0)
    a_safe = torch.where(ok, a, 1.0)
    new_inv = 1.0 / a_safe
    new_zero = -(t_mean - a_safe * q_mean) * new_inv
    return torch.where(ok, new_inv, inv), torch.where(ok, new_zero, zero)


def _solve(
    x: torch.Tensor, valid: torch.Tensor | None, qmax: int, params: HQQParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's ``(inverse step, zero)`` of fp32 groups ``x [R, G, g]`` (module docstring)."""
    count = None if valid is None else valid.sum(-1, keepdim=True).float()
    inv, zero = _minmax_init(x, valid, qmax)
    best_inv, best_zero = inv, zero
    best_err = torch.full_like(zero, math.inf)
    beta = params.beta
    for step in range(params.iters + 1):
        q = torch.round(x * inv + zero).clamp_(0, qmax)
        residual = x - (q - zero) / inv
        err = _mean(residual.abs(), valid, count)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_inv = torch.where(better, inv, best_inv)
        best_zero = torch.where(better, zero, best_zero)
        if step == params.iters or (params.early_stop and step > 0 and not bool(better.any())):
            break
        target = x - _shrink(residual, beta, params.lp_norm)
        if params.optimize_scale:
            inv, zero = _fit_scale_zero(q, target, inv, zero, valid, count)
        else:
            zero = _mean(q - target * inv, valid, count)
        beta *= params.kappa
    return best_inv, best_zero


def quantize_codes(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    axis: int = 1,
    *,
    method: Method = "hqq",
    params: HQQParams | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
    block_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked codes and metadata of ``weight``: ``(codes [R, C] uint8, scale, zero [R, G])``.

    The codes are rounded against the metadata *as stored* (in ``meta_dtype``), so they are the
    nearest codes for what dequantization will read.

    Args:
        weight: ``[out, in]`` floating tensor (any dtype; maths in fp32 on its device).
        bits: 1..8.
        group_size: values per group along the grouped axis (a short last group is allowed).
        axis: 1 groups along ``in`` (rows of ``weight``), 0 along ``out``.
        method: ``"hqq"`` (the solver) or ``"rtn"`` (min-max round-to-nearest).
        params: solver settings (HQQ only).
        meta_dtype: dtype of ``scale``/``zero`` (``bfloat16`` or ``float32``: fp16 would
            overflow the zero point of nearly flat groups).
        block_rows: rows solved at once (bounds the fp32 temporaries).
    """
    if meta_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"meta_dtype must be bfloat16 or float32, got {meta_dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if method not in ("hqq", "rtn"):
        raise ValueError(f"method must be 'hqq' or 'rtn', got {method!r}")
    hqq_word_layout(bits)  # checks bits
    rows = _stored(weight.detach(), axis)
    qmax = (1 << bits) - 1
    params = params or HQQParams()
    codes, scales, zeros = [], [], []
    for start in range(0, rows.shape[0], block_rows):
        x, valid = _grouped(rows[start : start + block_rows], group_size)
        if method == "rtn":
            inv, zero = _minmax_init(x, valid, qmax)
        else:
            inv, zero = _solve(x, valid, qmax, params)
        scale = (1.0 / inv).to(meta_dtype)
        zero = zero.to(meta_dtype)
        q = torch.round(x / scale.float() + zero.float()).clamp_(0, qmax).to(torch.uint8)
        codes.append(q.flatten(1)[:, : rows.shape[1]])
        scales.append(scale.squeeze(-1))
        zeros.append(zero.squeeze(-1))
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def quantize(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    axis: int = 1,
    *,
    method: Method = "hqq",
    params: HQQParams | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
    storage_dtype: torch.dtype = torch.uint8,
) -> HQQWeight:
    """Quantize ``weight [out, in]`` into packed :class:`HQQWeight` storage (HQQ or RTN).

    Args:
        weight: the dense weight.
        bits, group_size, axis, method, params, meta_dtype: see :func:`quantize_codes`.
        storage_dtype: dtype the packed bytes are viewed as (``uint8``; the compute dtype lets
            FSDP2 shard every tensor of a layer in one dtype).
    """
    codes, scale, zero = quantize_codes(
        weight, bits, group_size, axis, method=method, params=params, meta_dtype=meta_dtype
    )
    packed = pack_codes(codes, bits)
    if storage_dtype != torch.uint8:
        packed = packed.view(storage_dtype)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    return HQQWeight(packed, scale, zero, shape, bits, group_size, axis)


def reconstruction_error(weight: torch.Tensor, qweight: HQQWeight) -> dict[str, float]:
    """How far the eager dequantization of ``qweight`` is from ``weight``.

    Returns:
        ``mae`` (mean absolute error), ``rmse``, and ``sqnr_db`` (``10 log10(sum w^2 /
        sum err^2)``: higher is better).
    """
    w = weight.detach().float()
    err = qweight.dequantize_eager(torch.float32) - w
    mse = err.pow(2).mean().item()
    signal = w.pow(2).mean().item()
    return {
        "mae": err.abs().mean().item(),
        "rmse": math.sqrt(mse),
        "sqnr_db": 10.0 * math.log10(signal / mse) if mse > 0 else math.inf,
    }
