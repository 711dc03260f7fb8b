"""Compute ops: one file per op with Triton forward and backward kernels, an ``autograd.Function``
and a functional entry that falls back to the eager definition in ``ops.reference``.

Each functional entry runs its Triton kernels when :func:`use_triton` says so (Triton importable
and CUDA tensors, or ``TRITON_INTERPRET=1``) and the eager reference otherwise, so CPU training
works without Triton. Importing this package never requires Triton or a GPU.
"""

from turbotune.ops._triton import HAS_TRITON, use_triton
from turbotune.ops.cross_entropy import linear_cross_entropy
from turbotune.ops.reference import rotary_cos_sin
from turbotune.ops.rms_norm import rms_norm
from turbotune.ops.rope import apply_rotary
from turbotune.ops.swiglu import (
    geglu,
    geglu_backward,
    geglu_forward,
    swiglu,
    swiglu_backward,
    swiglu_forward,
)

__all__ = [
    "HAS_TRITON",
    "apply_rotary",
    "geglu",
    "geglu_backward",
    "geglu_forward",
    "linear_cross_entropy",
    "rms_norm",
    "rotary_cos_sin",
    "swiglu",
    "swiglu_backward",
    "swiglu_forward",
    "use_triton",
]
