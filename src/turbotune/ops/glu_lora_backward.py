"""The gated activation's backward, the down adapter's ``dA = g^T h`` (no ``h`` written) and
the gate/up adapters' ``dB`` in one pass.

Design note. The LoRA MLP's backward (``ops/lora_mlp_backward.py``) has, after the down
projection's input backward, ``dh`` ``[M, I]`` and ``g = s dy B_down`` ``[M, r]``. Before this
module, one kernel read ``dh``, ``e``, ``u`` and wrote ``de``, ``du`` and ``h = act(e) * u``
(over ``dh``), and a cuBLAS ``mm`` read ``h`` back for ``dA = g^T h``: 4 reads and 3 writes of
``[M, I]``. Here ``h`` never leaves the registers: each program owns a column block of ``I``,
walks the rows of ``M`` in ``BLOCK_M`` chunks, writes ``de``, ``du`` over ``e``, ``u`` and
accumulates its ``[r, BLOCK_I]`` slice of ``dA`` in fp32 with ``tl.dot`` (3 reads, 2 writes; at
Llama-8B's ``M = 4096``, ``I = 14336`` in bf16, 235 MB less traffic per layer and step).

``h`` is rounded to ``dh``'s dtype before the product, as ``glu_backward_h._bwd_h_kernel``
stores it, so ``dA`` equals ``g^T h`` of the old path up to summation order (and it is not
rounded to the compute dtype before the cast to ``A``'s dtype). ``tl.dot`` needs every dimension
>= 16: ``r`` is padded to a power of two >= 16 by masking rows of ``g^T``.

Only the column grid keeps ``dA`` free of atomics and partial buffers, but at ``I = 14336`` it
has only ``I / BLOCK_I`` programs (224 at 64) for 132 SMs. ``split_m > 1`` also splits the rows:
each of ``split_m`` row ranges writes an fp32 partial ``[r, I]``, summed after the kernel (a
``[split_m, r, I]`` reduction, ~1 MB per split at Llama-8B). ``CONFIG`` holds the launch
settings; ``benchmarks/glu_lora_backward.py`` measures the candidates on a GPU.

Same pass, the gate and up adapters' ``dB`` (:class:`GateUpT`, switch :data:`FUSED_DB`): the
gate/up group's backward needs ``dB_g = s_g de^T t_g`` and ``dB_u = s_u du^T t_u`` (``t = x A^T``,
``[M, r]``, saved by its forward), which were two cuBLAS products reading all of ``de`` and
``du`` back (43 us each per layer at Llama-8B on an H100). Each program holds its ``de``, ``du``
tiles and walks every row of its range, so it owns rows ``[BLOCK_I, r]`` of both: it sums
``t^T de`` (``[r, BLOCK_I]``, the same ``tl.dot`` shape as ``g^T h``) from ``de``, ``du`` as
rounded to their stored dtype (what the products read), scales by ``s`` at the store and writes
the transpose. The row split's fp32 partials of ``dA``, ``dB_g`` and ``dB_u`` are segments of
one buffer, summed by one reduction.

No dropout on down: ``D(h)`` under a keep mask stays on the old path (``swiglu_backward_with_h``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch

from turbotune.ops._triton import num_programs_hint, tl, triton, use_triton
from turbotune.ops.swiglu import _act_and_grad

__all__ = [
    "CONFIG",
    "ENABLED",
    "FUSED_DB",
    "GateUpT",
    "GluLoRAGrads",
    "LaunchConfig",
    "glu_backward_lora_da",
    "row_ranges",
    "supported",
    "takes_gate_up",
    "with_config",
]

Activation = Literal["silu", "gelu_tanh", "gelu"]
_ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

ENABLED = True
"""A/B switch: False keeps the old path (``swiglu_backward_with_h`` + ``mm``)."""

FUSED_DB = True
"""A/B switch: False leaves the gate/up adapters' ``dB`` to their group's backward (cuBLAS)."""


class GateUpT(NamedTuple):
    """The gate and up adapters' saved ``t = x A^T``, for their ``dB`` in the same pass.

    Attributes:
        t_gate: ``[M, r_g]`` (any row stride, unit column stride: a column view of the saved
            ``T`` or ``[x | T]``).
        t_up: ``[M, r_u]``.
        scalings: ``(s_g, s_u)``.
        dtypes: dtypes of ``(dB_g, dB_u)`` (the ``B`` parameters').
    """

    t_gate: torch.Tensor
    t_up: torch.Tensor
    scalings: tuple[float, float]
    dtypes: tuple[torch.dtype, torch.dtype]


class GluLoRAGrads(NamedTuple):
    """What :func:`glu_backward_lora_da` returns besides ``de``, ``du`` (written in place).

    Attributes:
        d_a: ``[r, I]`` the down adapter's ``dA``.
        d_b_gate: ``[I, r_g]`` ``s_g de^T t_g`` when :class:`GateUpT` was given, else None.
        d_b_up: ``[I, r_u]`` ``s_u du^T t_u``, likewise.
    """

    d_a: torch.Tensor
    d_b_gate: torch.Tensor | None = None
    d_b_up: torch.Tensor | None = None


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


# H100, Llama-8B MLP (4096 x 14336, r 16), with the gate/up dB: 64 x 32, 4 warps and 8 row
# ranges was the fastest of the session-5 kernel sweeps (which were noisy); 3 pipeline stages
# instead of 2 then gained 1.003x and 1.005x in two whole-step A/Bs (ab_point glu-st3).
CONFIG = LaunchConfig(num_stages=3, split_m=8)


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
    tg_ptr,
    stride_tgm,
    tu_ptr,
    stride_tum,
    dbg_ptr,
    stride_dbgs,
    stride_dbgi,
    dbu_ptr,
    stride_dbus,
    stride_dbui,
    scale_g,
    scale_u,
    n_rows,
    n_cols,
    rank,
    rank_g,
    rank_u,
    rows_per_split,
    ACTIVATION: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_DB: tl.constexpr,
    RT_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``de = dh * u * act'(e)``, ``du = dh * act(e)`` and ``dA += g^T h`` with ``h = act(e) * u``;
    with ``HAS_DB`` also ``dB_g += s_g de^T t_g`` and ``dB_u += s_u du^T t_u``.

    Program ``(i, s)`` owns columns ``[i BLOCK_I, (i + 1) BLOCK_I)`` of rows
    ``[s rows_per_split, (s + 1) rows_per_split)`` and writes its ``[r, BLOCK_I]`` sum of
    ``g^T h`` to slice ``s`` of ``da`` (in ``da``'s dtype), and its ``[BLOCK_I, r_g]``,
    ``[BLOCK_I, r_u]`` rows of the ``dB`` to slice ``s`` of ``dbg``, ``dbu``. ``de``/``du`` may
    alias ``e``/``u``: each element is read before it is written, by the one program that owns
    it. ``DOT_FP32`` feeds ``tl.dot`` the same (rounded) values as fp32: the Triton
    interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.9, see ``gptq.py``), its fp32 one is
    exact.
    """
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_mask = cols < n_cols
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    t_ranks = tl.arange(0, RT_PAD)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros((R_PAD, BLOCK_I), dtype=tl.float32)
    acc_g = tl.zeros((RT_PAD, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((RT_PAD, BLOCK_I), dtype=tl.float32)
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
        if HAS_DB:
            # t^T de: [r, BLOCK_I], the shape of g^T h (t loaded transposed, like g); de, du as
            # stored (masked rows and columns are 0: dh is).
            tg_t = tl.load(
                tg_ptr + rows[None, :] * stride_tgm + t_ranks[:, None],
                mask=(t_ranks < rank_g)[:, None] & row_mask[None, :],
                other=0.0,
            )
            tu_t = tl.load(
                tu_ptr + rows[None, :] * stride_tum + t_ranks[:, None],
                mask=(t_ranks < rank_u)[:, None] & row_mask[None, :],
                other=0.0,
            )
            if DOT_FP32:
                tg_t, tu_t = tg_t.to(tl.float32), tu_t.to(tl.float32)
                de, du = de.to(tl.float32), du.to(tl.float32)
            acc_g = tl.dot(tg_t, de, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(tu_t, du, acc_u, input_precision=DOT_PRECISION)
    da_ptrs = da_ptr + split * stride_das + ranks[:, None] * stride_dar + cols[None, :]
    tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=rank_mask[:, None] & col_mask[None, :])
    if HAS_DB:  # dB[i, k] = s acc[k, i]
        dbg_ptrs = dbg_ptr + split * stride_dbgs + cols[None, :] * stride_dbgi + t_ranks[:, None]
        db_g = (acc_g * scale_g).to(dbg_ptr.dtype.element_ty)
        tl.store(dbg_ptrs, db_g, mask=(t_ranks < rank_g)[:, None] & col_mask[None, :])
        dbu_ptrs = dbu_ptr + split * stride_dbus + cols[None, :] * stride_dbui + t_ranks[:, None]
        db_u = (acc_u * scale_u).to(dbu_ptr.dtype.element_ty)
        tl.store(dbu_ptrs, db_u, mask=(t_ranks < rank_u)[:, None] & col_mask[None, :])


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


def takes_gate_up(dh: torch.Tensor, gate_up: GateUpT) -> bool:
    """Whether the kernel (where :func:`supported` holds) also sums these adapters' ``dB``:
    :data:`FUSED_DB`, and each ``t`` 2-D ``[M, r]`` on ``dh``'s device with unit column stride."""
    if not FUSED_DB:
        return False
    for t in (gate_up.t_gate, gate_up.t_up):
        if t.ndim != 2 or t.shape[0] != dh.shape[0] or t.shape[1] == 0 or t.device != dh.device:
            return False
        if t.stride(1) != 1 and t.shape[1] > 1:
            return False
    return True


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
        splits = min(triton.cdiv(4 * num_programs_hint(device), n_col_blocks), n_rows // 256)
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
    gate_up: GateUpT | None = None,
) -> GluLoRAGrads:
    """``de``, ``du`` written over ``e``, ``u``; ``dA = g^T (act(e) * u)`` (and the gate/up
    adapters' ``dB``) returned.

    Call only where :func:`supported` holds (and :func:`takes_gate_up` with ``gate_up``); the
    caller keeps the eager path otherwise.

    Args:
        dh: ``[M, I]`` gradient of ``h = act(e) * u`` (read only).
        e: ``[M, I]`` gate output; overwritten by ``de`` (unit column stride).
        u: ``[M, I]`` up output; overwritten by ``du``.
        g: ``[M, r]`` ``s dy B`` of the down adapter (cast to ``dh``'s dtype if it differs).
        activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"``.
        out_dtype: dtype of ``dA`` (the down adapter's ``A``).
        config: launch settings; None: :data:`CONFIG`.
        gate_up: the gate and up adapters' ``t``, for ``dB_g = s_g de^T t_g`` and
            ``dB_u = s_u du^T t_u`` (``de``, ``du`` as rounded to ``e``'s dtype); None: no ``dB``.

    Returns:
        ``dA`` ``[r, I]`` in ``out_dtype`` and (with ``gate_up``) ``dB_g`` ``[I, r_g]``,
        ``dB_u`` ``[I, r_u]`` in their dtypes, all summed in fp32 and rounded once.
    """
    config = CONFIG if config is None else config
    n_rows, n_cols = dh.shape
    rank = g.shape[1]
    g = g if g.dtype == dh.dtype else g.to(dh.dtype)
    ranks = (rank,) if gate_up is None else (rank, gate_up.t_gate.shape[1], gate_up.t_up.shape[1])
    dtypes = (out_dtype,) if gate_up is None else (out_dtype, *gate_up.dtypes)
    shapes = [(rank, n_cols)] + [(n_cols, r) for r in ranks[1:]]
    if n_rows == 0 or rank == 0 or n_cols == 0:
        return GluLoRAGrads(
            *(torch.zeros(s, dtype=d, device=dh.device) for s, d in zip(shapes, dtypes))
        )
    splits, rows_per_split = row_ranges(n_rows, n_cols, config, dh.device)
    flat, (da, *dbs) = _partials(splits, shapes, dtypes, dh.device)
    if gate_up is None:
        tg = tu = g  # never read (HAS_DB off)
        dbg = dbu = da
        scalings = (1.0, 1.0)
    else:
        tg, tu = (t if t.dtype == e.dtype else t.to(e.dtype) for t in gate_up[:2])  # de's
        (dbg, dbu), scalings = dbs, gate_up.scalings
    dot_fp32 = not dh.is_cuda  # the interpreter
    _bwd_da_kernel[(triton.cdiv(n_cols, config.block_i), splits)](
        e, e.stride(0), u, u.stride(0), dh, dh.stride(0), e, e.stride(0), u, u.stride(0),
        g, g.stride(0), g.stride(1), da, da.stride(0), da.stride(1),
        tg, tg.stride(0), tu, tu.stride(0),
        dbg, dbg.stride(0), dbg.stride(1), dbu, dbu.stride(0), dbu.stride(1),
        float(scalings[0]), float(scalings[1]),
        n_rows, n_cols, rank, *(ranks[1:] or (0, 0)), rows_per_split,
        ACTIVATION=_ACTIVATION_IDS[activation], R_PAD=_padded_rank(rank),
        HAS_DB=gate_up is not None, RT_PAD=_padded_rank(max(ranks[1:], default=1)),
        BLOCK_M=config.block_m, BLOCK_I=config.block_i,
        DOT_PRECISION="ieee" if dot_fp32 or dh.dtype == torch.float32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return GluLoRAGrads(*_finish(flat, splits, shapes, dtypes))


def _padded_rank(rank: int) -> int:
    """``tl.dot`` needs every dimension >= 16 (and a power of two here)."""
    return max(16, triton.next_power_of_2(rank))


def _partials(
    splits: int,
    shapes: list[tuple[int, int]],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One ``[splits, sum numel]`` buffer and a ``[splits, *shape]`` view of each segment.

    One range stores every result in its own dtype when they share one; else (several ranges,
    or mixed dtypes) fp32 partials, summed and cast by :func:`_finish`.
    """
    same = all(d == dtypes[0] for d in dtypes)
    dtype = dtypes[0] if splits == 1 and same else torch.float32
    sizes = [rows * cols for rows, cols in shapes]
    flat = torch.empty(splits, sum(sizes), dtype=dtype, device=device)
    views, offset = [], 0
    for size, shape in zip(sizes, shapes):
        views.append(flat.narrow(1, offset, size).view(splits, *shape))
        offset += size
    return flat, views


def _finish(
    flat: torch.Tensor,
    splits: int,
    shapes: list[tuple[int, int]],
    dtypes: tuple[torch.dtype, ...],
) -> list[torch.Tensor]:
    """The summed partials of :func:`_partials`, each segment contiguous in its dtype: one
    reduction, and one cast when the dtypes agree."""
    total = flat[0] if splits == 1 else flat.sum(0)
    if all(d == dtypes[0] for d in dtypes):
        total = total if total.dtype == dtypes[0] else total.to(dtypes[0])
    out, offset = [], 0
    for shape, dtype in zip(shapes, dtypes):
        size = shape[0] * shape[1]
        part = total.narrow(0, offset, size).view(shape)
        out.append(part if part.dtype == dtype else part.to(dtype))
        offset += size
    return out


def with_config(**changes: int) -> LaunchConfig:
    """:data:`CONFIG` with some fields changed (for benchmarks)."""
    return replace(CONFIG, **changes)
