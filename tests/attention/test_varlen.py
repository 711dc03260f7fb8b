"""Every varlen-attention backend against the eager reference: output AND dq, dk, dv.

CPU: the exact per-sequence SDPA loop and FlexAttention (eager, small), plus the sequence
boundaries the interface derives. GPU (``-m gpu``): PyTorch's varlen kernel, flash-attn when
installed and compiled FlexAttention in bf16 at real shapes, judged by the flash-attention rule
(error vs the fp32 reference at most ~2x that of the eager bf16 run).
"""

from __future__ import annotations

import pytest
import torch

from turbotune.attention import available_backends, varlen_attention, varlen_attention_reference
from turbotune.attention.flex import document_ids
from turbotune.attention.interface import varlen_from_kwargs
from turbotune.attention.varlen import resolve_backend
from turbotune.data.padding_free import cu_seqlens_from_lengths


def inputs(lengths, hq, hk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for h in (hq, hk, hk)
    )
    cu = cu_seqlens_from_lengths(lengths).to(device)
    return q, k, v, cu, max(lengths)


def run(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check(got, ref, atol, label):
    (out, grads), (out_ref, grads_ref) = got, ref
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        diff = (a.float() - b.float()).abs()
        assert diff.max().item() <= atol, (
            f"{label} {name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"
        )


CASES = [((7, 13, 1, 10), 4, 2, 16, None), ((33,), 2, 2, 8, None), ((5, 17, 9), 6, 3, 16, 4)]


@pytest.mark.parametrize("lengths, hq, hk, d, window", CASES)
def test_sdpa_loop_matches_the_reference(lengths, hq, hk, d, window):
    torch.set_num_threads(1)
    q, k, v, cu, max_len = inputs(lengths, hq, hk, d)
    grad_out = torch.randn_like(q)
    ref = run(lambda *t: varlen_attention_reference(*t, cu, window=window), q, k, v, grad_out)
    got = run(
        lambda *t: varlen_attention(*t, cu, max_len, window=window, backend="sdpa_loop"),
        q, k, v, grad_out,
    )  # fmt: skip
    check(got, ref, 1e-5, "sdpa_loop")


@pytest.mark.parametrize("window", [None, 4])
def test_flex_forward_matches_the_reference_on_cpu(window):
    """FlexAttention has no CPU backward: its gradients are checked by the GPU test."""
    torch.set_num_threads(1)
    q, k, v, cu, max_len = (t.detach() if torch.is_tensor(t) else t for t in inputs(*CASES[2][:4]))
    ref = varlen_attention_reference(q, k, v, cu, window=window)
    out = varlen_attention(q, k, v, cu, max_len, window=window, backend="flex")
    assert max_err(out, ref) < 1e-5, f"max abs diff {max_err(out, ref):.3e}"


def test_reference_never_mixes_sequences():
    """Changing one sequence's keys and values leaves every other sequence's output alone."""
    q, k, v, cu, _ = inputs((4, 6, 5), 2, 2, 8)
    out = varlen_attention_reference(q, k, v, cu)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[4:10] += 3.0
    v2[4:10] -= 2.0
    out2 = varlen_attention_reference(q, k2, v2, cu)
    assert torch.equal(out[:4], out2[:4]) and torch.equal(out[10:], out2[10:])
    assert not torch.allclose(out[4:10], out2[4:10])


def test_boundaries_from_kwargs_positions_or_rows():
    device = torch.device("cpu")
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert varlen_from_kwargs({"cu_seq_lens_q": cu, "max_length_q": 3}, 1, 5, device)[1] == 3
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu_pos, longest = varlen_from_kwargs({"position_ids": pos}, 1, 9, device)
    assert cu_pos.tolist() == [0, 3, 5, 9] and longest == 4
    rows, longest = varlen_from_kwargs({}, 2, 6, device)
    assert rows.tolist() == [0, 6, 12] and longest == 6
    two_rows = torch.tensor([[0, 1, 2], [0, 1, 0]])
    assert varlen_from_kwargs({"position_ids": two_rows}, 2, 3, device)[0].tolist() == [0, 3, 5, 6]


def test_document_ids():
    assert document_ids(torch.tensor([0, 2, 5]), 5).tolist() == [0, 0, 1, 1, 1]
    assert document_ids(torch.tensor([0, 2, 2, 5]), 5).tolist() == [0, 0, 1, 1, 1]  # empty one


def test_backend_choice_on_cpu():
    q = torch.zeros(4, 2, 8)
    assert resolve_backend("auto", q) == "sdpa_loop"
    assert "sdpa_loop" in available_backends()
    with pytest.raises(ValueError, match="cannot run"):
        resolve_backend("varlen", q)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("nope", q)


# --- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [((1024, 517, 3, 2000, 96), 32, 8, 128), ((4096,), 16, 16, 64), ((300, 301), 9, 3, 64)]


def _gpu_backends() -> list[str]:
    return [b for b in ("flash_attn", "varlen", "flex") if b in available_backends()]


@pytest.mark.gpu
@pytest.mark.parametrize("lengths, hq, hk, d", GPU_SHAPES)
def test_gpu_backends_bf16_against_the_fp32_reference(lengths, hq, hk, d):
    backends = _gpu_backends()
    assert "varlen" in backends or "flash_attn" in backends, available_backends()
    q, k, v, cu, max_len = inputs(lengths, hq, hk, d, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = run(lambda *t: varlen_attention_reference(*t, cu), q32, k32, v32, grad_out.float())
    eager = run(lambda *t: varlen_attention_reference(*t, cu, upcast=False), q, k, v, grad_out)
    for backend in backends:  # flex is compiled on CUDA, so its backward is checked here
        got = run(
            lambda *t, b=backend: varlen_attention(*t, cu, max_len, backend=b), q, k, v, grad_out
        )
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            a = got[0] if i == 0 else got[1][i - 1]
            e = eager[0] if i == 0 else eager[1][i - 1]
            r = ref[0] if i == 0 else ref[1][i - 1]
            # 2x an eager bf16 run's error, 3x for the gradients: the kernels' backward sums dq
            # over key blocks in a different order (measured on the H100: dq 2.01x at 2000 tokens).
            factor = 2 if i == 0 else 3
            err, budget = max_err(a, r), factor * max_err(e, r) + 1e-3
            assert err <= budget, (
                f"{backend} {name}: error {err:.3e} > {factor}x eager bf16 {budget:.3e}"
            )


@pytest.mark.gpu
def test_gpu_auto_takes_a_fused_kernel_and_sliding_window():
    q, k, v, cu, max_len = inputs((200, 57, 311), 8, 4, 64, dtype=torch.bfloat16, device="cuda")
    assert resolve_backend("auto", q) in ("flash_attn", "varlen")
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cu, window=32)
    eager = varlen_attention_reference(q, k, v, cu, window=32, upcast=False)
    out = varlen_attention(q, k, v, cu, max_len, window=32)
    budget = 2 * max_err(eager, ref) + 1e-3
    assert max_err(out, ref) <= budget, f"error {max_err(out, ref):.3e} > budget {budget:.3e}"
