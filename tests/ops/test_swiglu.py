"""SwiGLU / GeGLU kernels vs the eager reference: output, dgate and dup; raw launchers too."""

from __future__ import annotations

import importlib

import pytest
import torch

from turbotune.ops import reference
from turbotune.ops.swiglu import (
    geglu,
    geglu_backward,
    geglu_backward_with_h,
    geglu_forward,
    swiglu,
    swiglu_backward,
    swiglu_backward_with_h,
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


# ---- backward that also writes h (the LoRA MLP's down adapter needs it after dh) ----

WITH_H = {
    "silu": (swiglu_backward_with_h, swiglu_forward, reference.swiglu),
    "gelu_tanh": (
        lambda dh, g, u, **kw: geglu_backward_with_h(dh, g, u, "tanh", **kw),
        lambda g, u: geglu_forward(g, u, "tanh"),
        lambda g, u: reference.geglu(g, u, "tanh"),
    ),
    "gelu": (
        lambda dh, g, u, **kw: geglu_backward_with_h(dh, g, u, "none", **kw),
        lambda g, u: geglu_forward(g, u, "none"),
        lambda g, u: reference.geglu(g, u, "none"),
    ),
}


def _inputs(shape, dtype, seed=0):
    """gate, up, grad_h rounded to ``dtype`` (kept in fp32: the reference sees the same values)."""
    master = _master(shape, seed)
    grad_h = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 7))
    return [t.detach().to(dtype).float() for t in (master["gate"], master["up"], grad_h)]


def _by_autograd(activation, gate, up, grad_h, dtype, keep=None, p=0.0):
    """``(grad_gate, grad_up, h)`` through the eager reference run in ``dtype``; ``D(h)`` with a
    keep mask, as the LoRA down projection's input is dropped out (``x * m / (1 - p)``)."""
    g, u = (t.to(dtype, copy=True).requires_grad_() for t in (gate, up))
    h = WITH_H[activation][2](g, u)
    h.backward(grad_h.to(dtype))
    h = h.detach()
    if keep is not None:
        h = (h * keep).mul_(1.0 / (1.0 - p))
    return g.grad, u.grad, h


def _assert_bounded(name, got, want, eager, device):
    """The flash-attention rule of ``conftest.check_parity``, for outputs of no autograd call."""
    want, dtype = want.float(), got.dtype
    eager_err = (eager.float() - want).abs().max().item()
    scale = want.abs().max().item() if want.numel() else 0.0
    slack, ulps = 2.0, (0.0 if dtype == torch.float32 else torch.finfo(dtype).eps)
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter truncates to bf16
        slack, ulps = 2 * slack, 2 * ulps
    bound = slack * eager_err + 1e-5 * max(1.0, scale) + ulps * scale
    diff = (got.float() - want).abs()
    assert diff.max().item() <= bound, (
        f"{name} ({dtype}): max abs diff {diff.max().item():.3e} (bound {bound:.3e}, eager "
        f"{eager_err:.3e}), mean abs diff {diff.mean().item():.3e}"
    )


def _check_with_h(activation, got, gate, up, grad_h, dtype, device, keep=None, p=0.0):
    want = _by_autograd(activation, gate, up, grad_h, torch.float32, keep, p)
    eager = _by_autograd(activation, gate, up, grad_h, dtype, keep, p)
    for name, g, w, e in zip(("grad_gate", "grad_up", "h"), got, want, eager):
        assert g.dtype == dtype and g.shape == w.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        _assert_bounded(name, g.cpu(), w, e, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", list(WITH_H))
def test_backward_with_h_matches_reference(activation, shape, dtype, device):
    """grad_gate, grad_up and h vs autograd through the fp32 reference; h equals the forward
    kernel's h (the down adapter's dA must see the h the forward multiplied)."""
    gate, up, grad_h = _inputs(shape, dtype)
    backward, forward, _ = WITH_H[activation]
    args = [t.to(device, dtype) for t in (grad_h, gate, up)]
    got = backward(*args)
    _check_with_h(activation, got, gate, up, grad_h, dtype, device)
    h_forward = forward(*args[1:])
    # Same fp32 formula, rounded once: identical on the interpreter; a compiler may contract
    # the two kernels' arithmetic differently, so one ulp on a GPU.
    tol = 0.0 if device.type == "cpu" else torch.finfo(dtype).eps
    torch.testing.assert_close(got[2], h_forward, atol=0.0, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_backward_with_h_in_place_over_a_stacked_buffer(activation, dtype, device):
    """As the LoRA MLP calls it: gate/up are the column halves of one [M, 2I] buffer (row
    stride 2I) and get grad_gate/grad_up; h is written over grad_h; with a dropout keep mask,
    h comes as D(h)."""
    rows, inter, p = 7, 37, 0.3
    gate, up, grad_h = _inputs((rows, inter), dtype, seed=3)
    keep = torch.rand(rows, inter, generator=torch.Generator().manual_seed(4)) >= p
    for mask in (None, keep):
        eu = torch.cat([gate, up], dim=1).to(device, dtype)
        e, u = eu.narrow(1, 0, inter), eu.narrow(1, inter, inter)
        dh = grad_h.to(device, dtype, copy=True)  # overwritten by h
        kept = None if mask is None else mask.to(device)
        dg, du, h = WITH_H[activation][0](
            dh, e, u, inplace=True, out_h=dh, keep=kept, dropout=p if mask is not None else 0.0
        )
        assert dg.data_ptr() == eu.data_ptr() and du.data_ptr() == u.data_ptr()
        assert h.data_ptr() == dh.data_ptr()
        got = (eu[:, :inter], eu[:, inter:], dh)  # what the buffers hold now
        _check_with_h(activation, got, gate, up, grad_h, dtype, device, mask, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_with_h_writes_into_a_buffer_it_cannot_view_as_rows(dtype, device):
    """out_h transposed (column stride != 1): written through a copy; gate/up left intact."""
    gate, up, grad_h = _inputs((6, 9), dtype, seed=5)
    args = [t.to(device, dtype) for t in (grad_h, gate, up)]
    out_h = torch.empty(9, 6, dtype=dtype, device=device).t()
    got = swiglu_backward_with_h(*args, out_h=out_h)
    assert got[2] is out_h
    _check_with_h("silu", got, gate, up, grad_h, dtype, device)
    assert torch.equal(args[1].cpu().float(), gate) and torch.equal(args[2].cpu().float(), up)


def test_backward_with_h_cpu_fallback_is_the_reference(monkeypatch):
    """Without Triton: reference.glu_backward_with_h, in place and into out_h by copies."""
    monkeypatch.setattr(swiglu_mod, "use_triton", lambda *tensors: False)
    gate, up, grad_h = _inputs((5, 30), torch.bfloat16, seed=6)
    keep = torch.rand(5, 30, generator=torch.Generator().manual_seed(8)) >= 0.2
    want = reference.glu_backward_with_h(grad_h, gate, up, "gelu", keep, 0.2)
    g, u, dh = (t.bfloat16() for t in (gate, up, grad_h))
    dg, du, h = geglu_backward_with_h(
        dh, g, u, "none", inplace=True, out_h=dh, keep=keep, dropout=0.2
    )
    assert dg is g and du is u and h is dh
    for got, ref in zip((dg, du, h), want):
        torch.testing.assert_close(got, ref.bfloat16(), atol=0, rtol=0)
    _check_with_h("gelu", (dg, du, h), gate, up, grad_h, torch.bfloat16, torch.device("cpu"),
                  keep, 0.2)  # fmt: skip


def test_backward_with_h_rejects_bad_arguments(device):
    t = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="dropout"):
        swiglu_backward_with_h(t, t, t, keep=t > 0, dropout=1.0)
    with pytest.raises(ValueError, match="keep"):
        swiglu_backward_with_h(t, t, t, keep=torch.ones(2, 9, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="bool"):
        swiglu_backward_with_h(t, t, t, keep=torch.ones_like(t))
    with pytest.raises(ValueError, match="one shape"):
        swiglu_backward_with_h(t, t, torch.randn(2, 9, device=device))


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


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gpu_backward_with_h_real_shape(activation):
    """Llama-8B MLP, 4096 tokens x 14336, bf16, as the LoRA MLP calls it (halves of [M, 2I],
    h over grad_h, a dropout mask): compiled kernel vs the fp32 reference."""
    rows, inter, p = 4096, 14336, 0.1
    cuda = torch.device("cuda")
    gate, up, grad_h = _inputs((rows, inter), torch.bfloat16, seed=9)
    keep = torch.rand(rows, inter, generator=torch.Generator().manual_seed(10)) >= p
    eu = torch.cat([gate, up], dim=1).to(cuda, torch.bfloat16)
    dh = grad_h.to(cuda, torch.bfloat16)
    WITH_H[activation][0](
        dh, eu[:, :inter], eu[:, inter:], inplace=True, out_h=dh, keep=keep.to(cuda), dropout=p
    )
    got = (eu[:, :inter], eu[:, inter:], dh)
    _check_with_h(activation, got, gate, up, grad_h, torch.bfloat16, cuda, keep, p)
