"""Guarded Triton import and the Triton-or-eager dispatch rule shared by every op.

``import turbotune.ops`` must work on machines without Triton (macOS, CPU-only CI). When Triton
is missing, ``triton`` and ``tl`` below are small stand-ins that only make the kernel modules
importable: ``@triton.jit`` returns the plain function and ``tl.constexpr`` exists for the
annotations. Such kernels are never launched, because :func:`use_triton` is then ``False`` and
every functional entry takes its eager path from ``ops/reference.py``.

Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when the
op module is imported; ``TRITON_INTERPRET=1`` must therefore be set before ``turbotune.ops`` is
first imported for kernels to run on CPU tensors.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton is optional: CPU training uses the eager references.
    HAS_TRITON = False

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    triton = SimpleNamespace(
        jit=lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f),
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=_next_power_of_2,
    )
    # ``tl.constexpr`` serves both as an annotation and to wrap module-level kernel constants.
    tl = SimpleNamespace(constexpr=lambda value=None: value)

__all__ = [
    "HAS_TRITON",
    "MAX_FUSED_SIZE",
    "backward_programs",
    "interpreting",
    "num_programs_hint",
    "row_block_settings",
    "tl",
    "triton",
    "use_triton",
]

# Largest row a single program keeps in registers (elements); wider rows need a looped kernel.
MAX_FUSED_SIZE = 65536


def interpreting() -> bool:
    """Whether the Triton interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` should run its Triton kernel rather than the eager reference.

    True when Triton is importable and either every tensor lives on a CUDA device or the
    interpreter is requested (``TRITON_INTERPRET=1``, which runs kernels on CPU tensors).
    """
    if not HAS_TRITON:
        return False
    # CUDA tensors first: the answer is then True either way, and this runs several hundred
    # times per training step (reading os.environ costs more than the rest of the check).
    # The environment is read on each CPU call, so tests may switch TRITON_INTERPRET at run time.
    for t in tensors:  # a loop, not all(<generator>): no generator object per call
        if not t.is_cuda:
            return interpreting()
    return True


def num_programs_hint(device: torch.device) -> int:
    """Number of persistent programs for two-stage reductions: the SM count on CUDA.

    The interpreter runs programs one after another, so a handful keeps it fast while still
    exercising the cross-program partial sums.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Off: row backwards without a weight gradient also run one persistent program per SM (as
# before session 5; A/B ``benchmarks/ab_point.py ... --variants row-grid,persistent``).
ROW_GRID_WITHOUT_DW = True


def backward_programs(device: torch.device, n_rows: int, compute_dw: bool) -> tuple[int, int]:
    """``(programs, rows per program)`` of a row-wise norm backward.

    A weight gradient is summed per program (one fp32 partial row each): a persistent program
    per SM keeps that reduction small. Without one (frozen norm weights: LoRA, QLoRA) a program
    per row lets the GPU keep many rows in flight: one program walking ~30 rows in turn
    leaves most of the memory bandwidth unused (an H100 add-norm backward at 4096 x 4096:
    68 us persistent vs ~2.8 TB/s for the one-row-per-program forward).
    """
    if ROW_GRID_WITHOUT_DW and not compute_dw:
        return max(1, n_rows), 1
    n_programs = max(1, min(num_programs_hint(device), n_rows))
    return n_programs, triton.cdiv(n_rows, n_programs)


def row_block_settings(n_cols: int) -> tuple[int, int]:
    """Block size (next power of two of ``n_cols``) and warp count for a one-row-per-program kernel.

    Raises:
        ValueError: if the row does not fit in one block.
    """
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {n_cols} elements exceed the fused block limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps
