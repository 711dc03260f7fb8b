"""SwiGLU / GeGLU kernels vs the eager reference: output, dgate and dup; raw launchers too."""

from __future__ import annotations

import importlib

import pytest
import torch

from turbotune.ops import reference
from turbotune.ops.swiglu import (
    geglu,
    geglu_backward,
    geglu_forward,
    swiglu,
    swiglu_backward,
    swiglu_forward,
)

# The op module itself, for monkeypatching (robust to a same-named function re-export).
swiglu_mod = importlib.import_module("turbotune.ops.swiglu")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Typical, prime (5, 3, 123), tiny, one above the 1024-column block; few rows keep the
# interpreter fast.
SHAPES = [(2, 4, 64), (5, 3, 123), (1, 1), (2, 1025)]
OPS = {
    "swiglu": (swiglu, reference.swiglu),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: reference.geglu(g, u, "tanh")),
    "geglu_erf": (lambda g, u: geglu(g, u, "none"), lambda g, u: reference.geglu(g, u, "none")),
}


def _master(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate = 3.0 * torch.randn(*shape, generator=gen)  # wide enough to reach the tails of act
    return {
        "gate": gate.requires_grad_(),
        "up": torch.randn(*shape, generator=gen).requires_grad_(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_reference(op, shape, dtype, device, parity):
    ours, ref = OPS[op]
    parity(
        lambda gate, up: ours(gate, up),
        lambda gate, up: ref(gate, up),
        _master(shape),
        dtype,
        device,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype, device, parity):
    """gate/up as halves of one fused gate_up projection (row stride 2I), and transposed views."""

    def halves(impl):
        return lambda gate_up: impl(*gate_up.chunk(2, dim=-1))

    def transposed(impl):
        return lambda gate, up: impl(gate.transpose(0, 1), up.transpose(0, 1))

    gen = torch.Generator().manual_seed(1)
    fused = {"gate_up": torch.randn(3, 6, 2 * 40, generator=gen).requires_grad_()}
    parity(halves(swiglu), halves(reference.swiglu), fused, dtype, device)
    parity(transposed(swiglu), transposed(reference.swiglu), _master((24, 5)), dtype, device)


@pytest.mark.parametrize(
    ("activation", "forward", "backward", "ref_forward"),
    [
        ("silu", swiglu_forward, swiglu_backward, reference.swiglu),
        (
            "gelu_tanh",
            lambda g, u: geglu_forward(g, u, "tanh"),
            lambda dh, g, u, **kw: geglu_backward(dh, g, u, "tanh", **kw),
            lambda g, u: reference.geglu(g, u, "tanh"),
        ),
        (
            "gelu",
            lambda g, u: geglu_forward(g, u, "none"),
            lambda dh, g, u, **kw: geglu_backward(dh, g, u, "none", **kw),
            lambda g, u: reference.geglu(g, u, "none"),
        ),
    ],
)
def test_raw_launchers(activation, forward, backward, ref_forward, device):
    """The autograd-free pair the fused LoRA MLP calls, including the in-place backward."""
    master = _master((6, 70), seed=2)
    gate, up = (t.detach().to(device) for t in master.values())
    grad_h = torch.randn(6, 70, generator=torch.Generator().manual_seed(5)).to(device)
    g_ref, u_ref = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h_ref = ref_forward(g_ref, u_ref)
    h_ref.backward(grad_h)
    torch.testing.assert_close(forward(gate, up), h_ref, atol=1e-5, rtol=1e-5)
    dg, du = backward(grad_h, gate, up)
    torch.testing.assert_close(dg, g_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du, u_ref.grad, atol=1e-5, rtol=1e-5)
    dg_in, du_in = backward(grad_h, gate, up, inplace=True)
    assert dg_in.data_ptr() == gate.data_ptr() and du_in.data_ptr() == up.data_ptr()
    torch.testing.assert_close(dg_in, g_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du_in, u_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_reference_backward_formula_matches_autograd(activation):
    """The closed-form eager backward (the CPU fallback of the raw launcher) vs autograd."""
    gate = (3 * torch.randn(40, 33, dtype=torch.float64)).requires_grad_()
    up = torch.randn(40, 33, dtype=torch.float64).requires_grad_()
    grad_h = torch.randn(40, 33, dtype=torch.float64)
    forward = {
        "silu": reference.swiglu,
        "gelu_tanh": lambda g, u: reference.geglu(g, u, "tanh"),
        "gelu": lambda g, u: reference.geglu(g, u, "none"),
    }[activation]
    forward(gate, up).backward(grad_h)
    dg, du = reference.glu_backward(grad_h, gate.detach(), up.detach(), activation)
    # The closed form runs in fp32 by design; compare at fp32 precision.
    torch.testing.assert_close(dg, gate.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du, up.grad, atol=1e-5, rtol=1e-5)


def test_uses_kernel(device):
    gate = torch.randn(2, 8, device=device, requires_grad=True)
    assert swiglu(gate, torch.randn(2, 8, device=device)).grad_fn.name() == "GLUFunctionBackward"


def test_rejects_mismatched_shapes(device):
    with pytest.raises(ValueError, match="one shape"):
        swiglu_forward(torch.randn(2, 8, device=device), torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.randn(2, 8, device=device), torch.randn(2, 8, device=device), "sigmoid")


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "use_triton", lambda *tensors: False)
    master = _master((4, 30))
    gate, up = master["gate"], master["up"]
    h = swiglu(gate, up)
    assert "GLUFunction" not in h.grad_fn.name()
    torch.testing.assert_close(h, reference.swiglu(gate, up), atol=0, rtol=0)
    grad_h = torch.randn(4, 30)
    dg, du = swiglu_backward(grad_h, gate.detach(), up.detach())
    h.backward(grad_h)
    torch.testing.assert_close(dg, gate.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(du, up.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_gpu_real_shape(op, parity):
    """Llama-8B MLP: 4096 tokens x 14336 intermediate, bf16, on the compiled kernels."""
    ours, ref = OPS[op]
    parity(
        lambda gate, up: ours(gate, up),
        lambda gate, up: ref(gate, up),
        _master((4096, 14336)),
        torch.bfloat16,
        torch.device("cuda"),
    )
