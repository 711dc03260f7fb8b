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
    "interpreting",
    "launch",
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
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def num_programs_hint(device: torch.device) -> int:
    """Number of persistent programs for two-stage reductions: the SM count on CUDA.

    The interpreter runs programs one after another, so a handful keeps it fast while still
    exercising the cross-program partial sums.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


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


# ---- launching -------------------------------------------------------------------------------
#
# ``kernel[grid](*args)`` costs 40-80 us of Python per launch in Triton 3.x (binding the
# signature, specializing every argument, hashing the cache key), about ten times the driver's
# own launch. A training step of an 8B model launches ~1,500 Triton kernels, and the CPU, not
# the GPU, then sets the step time (measured on an H100: the host thread was busy for the whole
# 271 ms step). ``launch`` keeps the compiled kernel per *cheap* key, the facts Triton
# specializes on (dtypes, 16-byte pointer alignment, small-int properties, constexpr values),
# and calls its launcher directly. The first launch of every key goes through Triton, and any
# surprise from a Triton version (a changed launcher signature) turns the fast path off.

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_compiled: dict[tuple, object] = {}
_signatures: dict[object, tuple[tuple[str, object], ...]] = {}
_fast = {"on": os.environ.get("TURBOTUNE_TRITON_FAST_LAUNCH", "1") != "0"}


def _spec(value: object) -> object:
    """What Triton specializes a launch argument on, as a hashable key part."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
        return value if not isinstance(value, float) else float
    if isinstance(value, int):
        return (value == 1, value % 16 == 0, -(2**31) <= value < 2**31, value >= 2**63)
    return value  # dtypes and other constexpr values


def _parameters(kernel: object) -> tuple[tuple[str, object], ...]:
    """``(name, default)`` of every kernel parameter, in signature order."""
    params = _signatures.get(kernel)
    if params is None:
        import inspect

        sig = inspect.signature(kernel.fn)
        params = tuple(
            (name, p.default if p.default is not inspect.Parameter.empty else _MISSING)
            for name, p in sig.parameters.items()
        )
        _signatures[kernel] = params
    return params


_MISSING = object()


def launch(kernel: object, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
    """``kernel[grid](*args, **kwargs)`` with the compiled kernel cached per cheap key.

    Constexpr and other arguments may be positional or keywords; ``num_warps`` and friends
    are launch options. Behaves exactly like ``kernel[grid]`` under the interpreter, when
    ``TURBOTUNE_TRITON_FAST_LAUNCH=0``, and on a kernel's first launch for a key.
    """
    if not _fast["on"] or callable(grid) or interpreting():
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, torch.cuda.current_device(), *map(_spec, args), *_kw_key(kwargs))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return
    params = _parameters(kernel)
    full = list(args)
    for name, default in params[len(args) :]:
        value = kwargs.get(name, default)
        if value is _MISSING:
            raise TypeError(f"{kernel}: missing argument {name!r}")
        full.append(value)
    try:
        _run(compiled, grid, full)
    except Exception:  # a Triton whose launcher differs: go back to the documented path
        _fast["on"] = False
        kernel[grid](*args, **kwargs)


def _kw_key(kwargs: dict[str, object]) -> tuple:
    return tuple((name, _spec(value)) for name, value in kwargs.items())


def _run(compiled: object, grid: tuple[int, ...], full: list[object]) -> None:
    from triton import knobs
    from triton.runtime import driver

    stream = driver.active.get_current_stream(torch.cuda.current_device())
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    metadata = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(
        grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata,
        enter, leave, *full,
    )  # fmt: skip
