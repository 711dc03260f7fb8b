"""Compute ops: one file per op with Triton forward and backward kernels, an ``autograd.Function``
and a functional entry that falls back to the eager definition in ``ops.reference``.

Import the functional entries from their modules::

    from turbotune.ops.rms_norm import rms_norm
    from turbotune.ops.rope import apply_rotary
    from turbotune.ops.swiglu import swiglu, geglu, swiglu_forward, swiglu_backward
    from turbotune.ops.cross_entropy import linear_cross_entropy

(the package does not re-export them: a function named like its module would shadow the module,
and importing one op should not import every kernel). Each entry runs its Triton kernels when
:func:`use_triton` says so (Triton importable and CUDA tensors, or ``TRITON_INTERPRET=1``) and
the eager reference otherwise, so CPU training works without Triton. Importing any of this
never requires Triton or a GPU.
"""

from turbotune.ops._triton import HAS_TRITON, use_triton

__all__ = ["HAS_TRITON", "use_triton"]
