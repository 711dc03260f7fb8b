"""``import turbotune.ops`` and every op work on CPU when Triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # `import triton` now raises ImportError, as if not installed
    sys.modules["triton.language"] = None
    import types

    import torch
    import turbotune.ops
    from turbotune.ops import reference as ref
    from turbotune.ops.cross_entropy import linear_cross_entropy
    from turbotune.ops.rms_norm import rms_norm
    from turbotune.ops.rope import apply_rotary
    from turbotune.ops.swiglu import geglu, swiglu, swiglu_backward

    assert not turbotune.ops.HAS_TRITON
    assert not turbotune.ops.use_triton(torch.zeros(1))  # even with TRITON_INTERPRET=1 in the env
    ops = types.SimpleNamespace(
        rms_norm=rms_norm, apply_rotary=apply_rotary, rotary_cos_sin=ref.rotary_cos_sin,
        swiglu=swiglu, geglu=geglu, swiglu_backward=swiglu_backward,
        linear_cross_entropy=linear_cross_entropy,
    )
    torch.manual_seed(0)

    x, w = torch.randn(3, 8, requires_grad=True), torch.rand(8, requires_grad=True)
    y = ops.rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert torch.equal(y, ref.rms_norm(x, w, 1e-6)) and w.grad is not None

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos, sin = ops.rotary_cos_sin(torch.rand(4), torch.arange(4)[None])
    for got, want in zip(ops.apply_rotary(q, k, cos, sin), ref.apply_rotary(q, k, cos, sin)):
        assert torch.equal(got, want)

    g, u, dh = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(ops.swiglu(g, u), ref.swiglu(g, u))
    assert torch.equal(ops.geglu(g, u, "none"), ref.geglu(g, u, "none"))
    dg, du = ops.swiglu_backward(dh, g, u)
    assert dg.shape == g.shape and du.shape == u.shape

    h, lm = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    labels = torch.tensor([1, -100, 3, 10, 0])
    loss = ops.linear_cross_entropy(h, lm, labels)
    loss.backward()
    assert torch.equal(loss, ref.linear_cross_entropy(h, lm, labels)) and h.grad is not None
    print("ok")
    """
)


def test_ops_work_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
