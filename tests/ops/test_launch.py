"""The cached Triton launcher (``ops._triton.launch``) computes what ``kernel[grid]`` computes."""

from __future__ import annotations

import pytest
import torch

from turbotune.ops import _triton, reference
from turbotune.ops.rms_norm import rms_norm


def test_spec_separates_what_triton_specializes_on():
    spec = _triton._spec
    buf = torch.zeros(64, dtype=torch.float32)
    assert spec(buf) != spec(buf[1:])  # 16-byte alignment of the pointer
    assert spec(buf) != spec(buf.half())  # dtype
    assert spec(1) != spec(2) != spec(16)  # == 1, multiple of 16
    assert spec(2**31) != spec(2**31 - 1)  # int32 vs int64
    assert spec(3) == spec(5)  # Triton compiles those alike: one cache entry
    assert spec(True) != spec(False)


@pytest.mark.gpu
def test_fast_path_engages_and_matches_reference_on_aligned_and_misaligned_inputs():
    torch.manual_seed(0)
    flat = torch.randn(4096 * 33 + 3, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    views = [flat[: 4096 * 33].view(33, 4096), flat[3 : 3 + 4096 * 33].view(33, 4096)]
    for _ in range(3):  # the second and third launches of each key take the fast path
        for x in views:
            y = rms_norm(x, w, 1e-5)
            ref = reference.rms_norm(x.float(), w.float(), 1e-5)
            diff = (y.float() - ref).abs().max().item()
            assert diff < 0.05, f"max abs diff {diff}"
    assert _triton._fast["on"], "the fast launch path turned itself off on this Triton"
    keys = [k for k in _triton._compiled if k[0].__name__ == "_fwd_kernel"]
    assert len(keys) >= 2, "aligned and misaligned inputs must be compiled separately"
