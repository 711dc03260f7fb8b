"""RMSNorm kernel vs the eager reference: output, dx and dw, across shapes, dtypes and strides."""

from __future__ import annotations

import importlib

import pytest
import torch

from turbotune.ops import reference
from turbotune.ops.rms_norm import rms_norm

# The op module itself, for monkeypatching (robust to a same-named function re-export).
rms_norm_mod = importlib.import_module("turbotune.ops.rms_norm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, hidden): typical, prime, tiny, one above the 128 block.
SHAPES = [((2, 8), 64), ((3, 5), 123), ((1, 1), 8), ((4,), 129)]


def _inputs(lead: tuple[int, ...], hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen) * 3.0
    w = 1.0 + 0.5 * torch.randn(hidden, generator=gen)
    return {"x": x.requires_grad_(), "w": w.requires_grad_()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "hidden"), SHAPES)
def test_matches_reference(lead, hidden, dtype, device, parity):
    parity(
        lambda x, w: rms_norm(x, w, 1e-6),
        lambda x, w: reference.rms_norm(x, w, 1e-6),
        _inputs(lead, hidden),
        dtype,
        device,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_offset_and_casting(casting, dtype, device, parity):
    parity(
        lambda x, w: rms_norm(x, w, 1e-5, offset=1.0, casting=casting),
        lambda x, w: reference.rms_norm(x, w, 1e-5, offset=1.0, casting=casting),
        _inputs((3, 4), 96, seed=1),
        dtype,
        device,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype, device, parity):
    """A slice of a wider tensor (row stride != H) and a transposed view (column stride != 1)."""

    def sliced(impl):
        return lambda x, w: impl(x[:, 1:, 3:99], w, 1e-6)

    def transposed(impl):
        return lambda x, w: impl(x.transpose(1, 2), w, 1e-6)

    wide = {"x": torch.randn(2, 6, 128).requires_grad_(), "w": torch.rand(96).requires_grad_()}
    parity(sliced(rms_norm), sliced(reference.rms_norm), wide, dtype, device)
    tall = {"x": torch.randn(2, 40, 5).requires_grad_(), "w": torch.rand(40).requires_grad_()}
    parity(transposed(rms_norm), transposed(reference.rms_norm), tall, dtype, device)


def test_mixed_precision_fp32_weight(device):
    """bf16 activations with an fp32 weight give an fp32 output, as LlamaRMSNorm does."""
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    w = torch.rand(64, device=device, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    want = reference.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    # The normalised row is rounded to bf16 before the fp32 weight multiply; rounding it one ulp
    # apart (the interpreter truncates) moves an element by at most 2^-7 relative.
    torch.testing.assert_close(y, want, atol=1e-6, rtol=2**-7)
    y.sum().backward()
    # dw sums those rounded rows (4 here); the sum can cancel, so bound it absolutely.
    atol = 2**-7 * reference.rms_norm(x, torch.ones_like(w), 1e-6).abs().sum(0).max().item()
    torch.testing.assert_close(w.grad, reference_dw(x, w), atol=atol, rtol=0)


def reference_dw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_()
    reference.rms_norm(x, w, 1e-6).sum().backward()
    return w.grad


def test_matches_hf_llama_rmsnorm(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(80, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(80, generator=gen) + 0.5)
    x = torch.randn(3, 7, 80, generator=gen).to(device=device, dtype=torch.bfloat16)
    got, want = rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    # Same maths and roundings; rsqrt/summation order can flip each of the two bf16 roundings,
    # one ulp (2^-8 relative) each on GPU; the interpreter truncates, doubling that.
    rtol = 2**-7 if device.type == "cuda" else 2**-6
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)


def test_frozen_weight_skips_dw(device):
    x = torch.randn(6, 32, device=device, requires_grad=True)
    w = torch.rand(32, device=device)
    rms_norm(x, w, 1e-6).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference.rms_norm(x_ref, w, 1e-6).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert w.grad is None


def test_uses_kernel(device):
    x = torch.randn(2, 16, device=device, requires_grad=True)
    assert rms_norm(x, torch.ones(16, device=device), 1e-6).grad_fn.name() == (
        "RMSNormFunctionBackward"
    )


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(rms_norm_mod, "use_triton", lambda *tensors: False)
    x = torch.randn(3, 5, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)
    y = rms_norm(x, w, 1e-6, offset=1.0)
    assert "RMSNormFunction" not in y.grad_fn.name()
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6, offset=1.0), atol=0, rtol=0)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shape(dtype, parity):
    """Llama-8B hidden size, 4 x 2048 tokens, on the compiled kernels."""
    gen = torch.Generator().manual_seed(0)
    master = {
        "x": torch.randn(4, 2048, 4096, generator=gen).requires_grad_(),
        "w": (1 + 0.1 * torch.randn(4096, generator=gen)).requires_grad_(),
    }
    parity(
        lambda x, w: rms_norm(x, w, 1e-5),
        lambda x, w: reference.rms_norm(x, w, 1e-5),
        master,
        dtype,
        torch.device("cuda"),
    )
