"""Kernel-test setup: Triton interpreter on CPU, device choice, and the parity checker.

Triton picks compile-or-interpret when a kernel is decorated (when ``turbotune.ops`` is first
imported), so ``TRITON_INTERPRET=1`` is set here at import time, before anything below imports
Triton. On a CUDA machine it is left unset and the same tests run the compiled kernels on GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from collections.abc import Callable

import pytest

from turbotune.ops._triton import HAS_TRITON, use_triton


def _compiled_kernels_on_cpu() -> list[str]:
    """Names of already-decorated kernels that would be compiled, not interpreted."""
    from triton.runtime.jit import JITFunction

    found = []
    for name, module in list(sys.modules.items()):
        if name.startswith("turbotune.ops.") and module is not None:
            found += [f"{name}.{k}" for k, v in vars(module).items() if isinstance(v, JITFunction)]
    return found


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA if present, else CPU through the Triton interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not HAS_TRITON:
        pytest.skip(
            "triton is not installed: kernel tests need it (CPU runs use TRITON_INTERPRET=1)"
        )
    if not use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is set to a false value: CPU kernel tests are off")
    compiled = _compiled_kernels_on_cpu()
    if compiled:
        pytest.fail(
            "turbotune.ops was imported before TRITON_INTERPRET=1 was set, so these kernels "
            f"compile instead of interpreting: {compiled[:3]}. Set it in tests/conftest.py."
        )
    return torch.device("cpu")


def _diff_message(name: str, got: torch.Tensor, want: torch.Tensor, bound: float) -> str:
    diff = (got.float() - want.float()).abs()
    where = (
        tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.ndim else ()
    )
    return (
        f"{name}: max abs diff {diff.max().item():.3e} at {where} (bound {bound:.3e}), "
        f"mean abs diff {diff.mean().item():.3e}, max |reference| {want.abs().max().item():.3e}"
    )


def _leaves(master: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
    """Fresh leaf copies: floating tensors cast to ``dtype``; those with grad keep requiring it."""
    out = {}
    for k, v in master.items():
        if v is None or not v.is_floating_point():
            out[k] = v.to(device) if v is not None else None
        else:
            out[k] = v.detach().to(device=device, dtype=dtype).requires_grad_(v.requires_grad)
    return out


def check_parity(
    ours: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    master: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    *,
    floor: float = 1e-5,
    slack: float = 2.0,
    seed: int = 0,
) -> None:
    """Check output and every input gradient of ``ours`` against ``ref`` run in fp32.

    The inputs are first rounded to ``dtype``, so the fp32 reference sees exactly what the
    low-precision runs see and only computation error is measured. The bound on ``ours`` is
    ``slack * (error of ref run in dtype) + floor * max(1, max|reference|)`` (the
    flash-attention rule) plus one ulp of ``dtype`` at ``max|reference|``; in fp32 the eager
    error is 0 and only the floor remains.

    Args:
        ours: function under test, called with keyword tensors from ``master``.
        ref: eager reference with the same signature.
        master: named inputs; floating ones with ``requires_grad`` get gradients checked.
        dtype: precision of the runs under test.
        device: where to run.
        floor: relative absolute floor (see above).
        slack: allowed multiple of the eager low-precision error.
        seed: seed of the shared random ``grad_output``.
    """
    rounded = {
        k: v.detach().to(dtype).to(v.dtype).requires_grad_(v.requires_grad)
        if v is not None and v.is_floating_point()
        else v
        for k, v in master.items()
    }
    runs = {}
    gen = torch.Generator().manual_seed(seed)
    grad_out = None
    for label, fn, run_dtype in (
        ("ref", ref, torch.float32),
        ("eager", ref, dtype),
        ("ours", ours, dtype),
    ):
        leaves = _leaves(rounded, run_dtype, device)
        out = fn(**leaves)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device)
        out.backward(grad_out.to(out.dtype))
        grads = {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}
        runs[label] = {"output": out.detach(), **grads}
    # One ulp of the largest value: on tiny tensors the eager run can be lucky (max error far
    # below its worst case), which alone would make the ratio rule flaky.
    ulps = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    if dtype == torch.bfloat16 and device.type == "cpu":
        # Triton's interpreter converts fp32 -> bf16 by truncation where the GPU rounds to nearest
        # even, so every bf16 store can be off by a whole ulp instead of half of one.
        slack, ulps = 2.0 * slack, 2.0 * ulps
    failures = []
    for name, want in runs["ref"].items():
        got, eager = runs["ours"][name], runs["eager"][name]
        assert got is not None, f"{name}: no gradient from the function under test"
        eager_err = (eager.float() - want).abs().max().item()
        scale = want.abs().max().item()
        bound = slack * eager_err + floor * max(1.0, scale) + ulps * scale
        if not (got.float() - want).abs().max().item() <= bound:
            failures.append(_diff_message(name, got, want, bound) + f", eager err {eager_err:.3e}")
        assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype}, eager gives {eager.dtype}"
    assert not failures, f"{dtype} parity failed:\n" + "\n".join(failures)


@pytest.fixture
def parity() -> Callable[..., None]:
    """The :func:`check_parity` function (fixtures keep it importable without a package)."""
    return check_parity
