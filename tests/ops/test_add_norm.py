"""Residual add + RMSNorm kernels: values and every gradient vs the fp32 reference, bit-equality
with the unfused path (torch add + the RMSNorm kernel + autograd's gradient sum), the
pass-through form, one-sided gradients, spare columns and the eager fallback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch

from turbotune.ops import reference, spare_columns
from turbotune.ops.add_norm import add_rms_norm, rms_norm_with_residual
from turbotune.ops.rms_norm import rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, hidden): typical, prime, tiny, one above the 128 block.
SHAPES = [((2, 8), 64), ((3, 5), 123), ((1, 1), 8), ((4,), 129)]


def _inputs(lead, hidden, seed=0, weight_grad=True):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(*lead, hidden, generator=gen) * 3.0
    h = torch.randn(*lead, hidden, generator=gen)
    w = 1.0 + 0.5 * torch.randn(hidden, generator=gen)
    return {"r": r.requires_grad_(), "h": h.requires_grad_(), "w": w.requires_grad_(weight_grad)}


def _stacked(fn, **kw):
    """One output for the parity checker: ``[s; y]``, so the random grad feeds ds and dy."""

    def run(r, h, w):
        s, y = fn(r, h, w, 1e-6, **kw)
        return torch.stack((s, y))

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "hidden"), SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable", "frozen"])
def test_add_rms_norm_matches_reference(lead, hidden, dtype, weight_grad, device, parity):
    parity(
        _stacked(add_rms_norm),
        _stacked(reference.add_rms_norm),
        _inputs(lead, hidden, weight_grad=weight_grad),
        dtype,
        device,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_offset_casting_and_multiplier(casting, dtype, device, parity):
    kw = dict(offset=1.0, casting=casting, multiplier=0.22)
    parity(
        _stacked(add_rms_norm, **kw),
        _stacked(reference.add_rms_norm, **kw),
        _inputs((3, 4), 96, seed=1),
        dtype,
        device,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "hidden"), SHAPES[1:3])
def test_pass_through_matches_reference(lead, hidden, dtype, device, parity):
    def stacked(fn):
        return lambda r, w: torch.stack(fn(r, w, 1e-6))

    master = _inputs(lead, hidden)
    del master["h"]
    parity(stacked(rms_norm_with_residual), stacked(reference.rms_norm_with_residual), master, dtype, device)  # fmt: skip


def _grads(out_s, out_y, leaves, ds, dy):
    torch.autograd.backward((out_s, out_y), (ds, dy))
    return [t.grad for t in leaves]


# bf16 only on the GPU: the Triton interpreter truncates fp32 -> bf16 where torch.add rounds.
EXACT = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", EXACT, ids=str)
@pytest.mark.parametrize("multiplier", [None, 0.22])  # 0.22: h * m rounds
def test_bit_equal_to_unfused(dtype, multiplier, device):
    """s, y and every gradient equal, bit for bit, the unfused torch add + RMSNorm kernel."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(5, 7, 123, generator=gen) for _ in range(4)]
    w0 = 1 + 0.5 * torch.randn(123, generator=gen)

    def leaves():
        r, h = (t.to(device, dtype).requires_grad_() for t in base[:2])
        return r, h, w0.to(device, dtype).requires_grad_()

    ds, dy = (t.to(device, dtype) for t in base[2:])
    r, h, w = leaves()
    s, y = add_rms_norm(r, h, w, 1e-6, multiplier=multiplier)
    ours = [s, y, *_grads(s, y, (r, h, w), ds, dy)]
    r, h, w = leaves()
    s = r + (h if multiplier is None else h * multiplier)
    y = rms_norm(s, w, 1e-6)
    theirs = [s, y, *_grads(s, y, (r, h, w), ds, dy)]
    for name, a, b in zip(("s", "y", "d_residual", "d_h", "d_weight"), ours, theirs):
        diff = (a.float() - b.float()).abs()
        assert torch.equal(a, b), f"{name}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_pass_through_bit_equal_and_no_copy(device):
    """x_out shares x's memory; dx = d_residual + norm backward equals autograd's sum exactly."""
    gen = torch.Generator().manual_seed(4)
    x0, dres, dy = (torch.randn(6, 200, generator=gen).to(device) for _ in range(3))
    w0 = (1 + 0.5 * torch.randn(200, generator=gen)).to(device)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    x_out, y = rms_norm_with_residual(x, w, 1e-5)
    assert x_out.data_ptr() == x.data_ptr() and torch.equal(x_out, x)
    ours = [y, *_grads(x_out * 1.0, y, (x, w), dres, dy)]
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = rms_norm(x, w, 1e-5)
    theirs = [y, *_grads(x * 1.0, y, (x, w), dres, dy)]
    for name, a, b in zip(("y", "dx", "dw"), ours, theirs):
        assert torch.equal(a, b), f"{name}: max abs diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("used", ["s", "y"])
def test_one_sided_gradients(used, device):
    """Only s (or only y) reaches the loss: the backward gets None for the other output."""
    gen = torch.Generator().manual_seed(5)
    r0, h0, g = (torch.randn(4, 96, generator=gen).to(device) for _ in range(3))
    w0 = (1 + torch.rand(96, generator=gen)).to(device)
    results = []
    for fn in (add_rms_norm, reference.add_rms_norm):
        r, h, w = (t.clone().requires_grad_() for t in (r0, h0, w0))
        s, y = fn(r, h, w, 1e-6, multiplier=0.5)
        (s if used == "s" else y).backward(g)
        results.append([r.grad, h.grad, w.grad])
    for name, a, b in zip(("r", "h", "w"), *results):
        if b is None:
            assert a is None or not a.any(), f"{name}: gradient where the reference has none"
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_strided_and_mixed_dtype_inputs(device):
    """A residual sliced from a wider tensor and an h of a lower dtype: s is fp32 as torch's."""
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(3, 4, 150, generator=gen).to(device)
    h0 = torch.randn(3, 4, 128, generator=gen).to(device, torch.float16)
    w0 = torch.rand(128, generator=gen).to(device)
    runs = []
    for fn in (add_rms_norm, reference.add_rms_norm):
        wd, h, w = (t.clone().requires_grad_() for t in (wide, h0, w0))
        s, y = fn(wd[..., 5:133], h, w, 1e-6)
        torch.autograd.backward((s, y), (torch.ones_like(s), torch.cos(y)))
        runs.append([s, y, wd.grad, h.grad, w.grad])
    assert runs[0][0].dtype == torch.float32 and runs[0][3].dtype == torch.float16
    for name, a, b in zip(("s", "y", "d_wide", "d_h", "dw"), *runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_output_offers_spare_columns(device):
    """y is a column view of [N, H + spare] and a folded group can claim it, as with rms_norm."""
    spare_columns.reset()
    try:
        x = torch.randn(8, 64, device=device)
        assert spare_columns.claim(x, 32) is None  # asks for 32 spare columns from now on
        _, y = add_rms_norm(x, x, torch.ones(64, device=device), 1e-6)
        assert y.stride(0) == 64 + spare_columns.wanted()
        assert spare_columns.claim(y, 32) is not None
        _, y2 = rms_norm_with_residual(x, torch.ones(64, device=device), 1e-6)
        assert spare_columns.claim(y2, 32) is not None
    finally:
        spare_columns.reset()


def test_eager_fallback_without_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    r, h, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16)
    s, y = add_rms_norm(r, h, w, 1e-6)
    assert torch.equal(s, r + h) and torch.equal(y, reference.rms_norm(r + h, w, 1e-6))
    x_out, y = rms_norm_with_residual(r, w, 1e-6)
    assert x_out is r and torch.equal(y, reference.rms_norm(r, w, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("multiplier", [None, 0.22])
def test_gpu_llama8b_shape_bit_equal_to_unfused(multiplier):
    """4096 tokens x 4096 hidden bf16: values and gradients bit-equal to the unfused path."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    r0, h0, ds, dy = (
        torch.randn(4096, 4096, device="cuda", generator=gen).bfloat16() for _ in range(4)
    )
    w0 = (1 + 0.1 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()
    runs = []
    for fused in (True, False):
        r, h, w = (t.clone().requires_grad_() for t in (r0, h0, w0))
        if fused:
            s, y = add_rms_norm(r, h, w, 1e-5, multiplier=multiplier)
        else:
            s = r + (h if multiplier is None else h * multiplier)
            y = rms_norm(s, w, 1e-5)
        runs.append([s, y, *_grads(s, y, (r, h, w), ds, dy)])
    for name, a, b in zip(("s", "y", "d_residual", "d_h"), *runs):
        assert torch.equal(a, b), f"{name}: max abs diff {(a.float() - b.float()).abs().max():.3e}"
    # dw: the same fp32 partial sums, reduced by torch.sum over programs in both paths.
    torch.testing.assert_close(runs[0][4], runs[1][4], rtol=0, atol=0)


def test_works_without_triton():
    """Importable and correct (eager references) where Triton is not installed."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = sys.modules["triton.language"] = None  # ImportError on import
        import torch
        from turbotune.ops import reference as ref
        from turbotune.ops.add_norm import add_rms_norm, rms_norm_with_residual

        r, h, w = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8), torch.rand(8)
        s, y = add_rms_norm(r, h, w, 1e-6, multiplier=0.3)
        (s.sum() + y.sum()).backward()
        assert torch.equal(y, ref.rms_norm(r + h * 0.3, w, 1e-6)) and r.grad is not None
        x, y = rms_norm_with_residual(r, w, 1e-6)
        assert x is r and torch.equal(y, ref.rms_norm(r, w, 1e-6))
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


def test_input_gradient_written_into_the_registered_buffer(device):
    """Under ``spare_columns.gradient_into(x, rows)`` (CUDA graphs of a layer stack) the
    pass-through norm's backward writes dx into ``rows``, bit-equal to the usual result."""
    gen = torch.Generator().manual_seed(5)
    x0, dres, dy = (torch.randn(6, 200, generator=gen).to(device) for _ in range(3))
    w = (1 + 0.5 * torch.randn(200, generator=gen)).to(device)

    def dx(into: bool) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        x_out, y = rms_norm_with_residual(x, w, 1e-5)
        rows = torch.full((6, 200 + 16), float("nan"), device=device)[:, :200]
        ctx = spare_columns.gradient_into(x, rows) if into else contextlib.nullcontext()
        with ctx:
            (grad,) = torch.autograd.grad((x_out * dres).sum() + (y * dy).sum(), [x])
        if into:
            assert grad.data_ptr() == rows.data_ptr() and grad.stride() == rows.stride()
        return grad

    ours, theirs = dx(True), dx(False)
    assert torch.equal(ours, theirs), f"max abs diff {(ours - theirs).abs().max():.3e}"


@pytest.mark.parametrize("fn", ["add_rms_norm", "rms_norm"])
def test_frozen_weight_row_grid_equals_persistent_programs(fn, device, monkeypatch):
    """Without a weight gradient the backward runs one program per row
    (``_triton.ROW_GRID_WITHOUT_DW``); the persistent grid gives bit-equal input gradients."""
    from turbotune.ops import _triton

    gen = torch.Generator().manual_seed(6)
    r0, h0, ds, dy = (torch.randn(37, 96, generator=gen).to(device) for _ in range(4))
    w = (1 + 0.5 * torch.randn(96, generator=gen)).to(device)

    def grads(row_grid: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(_triton, "ROW_GRID_WITHOUT_DW", row_grid)
        r, h = r0.clone().requires_grad_(), h0.clone().requires_grad_()
        if fn == "rms_norm":
            y = rms_norm(r, w, 1e-6)
            return list(torch.autograd.grad((y * dy).sum(), [r]))
        s, y = add_rms_norm(r, h, w, 1e-6)
        return list(torch.autograd.grad((s * ds).sum() + (y * dy).sum(), [r, h]))

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b), f"max abs diff {(a - b).abs().max():.3e}"
