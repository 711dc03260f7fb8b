"""Fused linear cross-entropy vs the eager reference: loss and grads of hidden, weight, bias."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from turbotune.ops import reference
from turbotune.ops.cross_entropy import auto_chunk_size, linear_cross_entropy

# The op module itself, for monkeypatching (robust to a same-named function re-export).
ce_mod = importlib.import_module("turbotune.ops.cross_entropy")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, H, V): typical, prime, tiny, and V one above the (test-lowered) 256 vocab block.
SHAPES = [(12, 64, 500), (13, 61, 997), (1, 8, 3), (8, 32, 257)]


@pytest.fixture(autouse=True)
def small_vocab_block(monkeypatch):
    """A 256-wide vocabulary block so the online logsumexp loops over several blocks."""
    monkeypatch.setattr(ce_mod, "_MAX_BLOCK_V", 256)


def _master(n, hidden, vocab, *, bias=False, ignore_every=4, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::ignore_every] = ignore_index
    if n == 1:
        labels[0] = vocab - 1  # keep the tiny case counted
    master = {
        "hidden": torch.randn(n, hidden, generator=gen).requires_grad_(),
        # ~unit-variance logits: a realistic, non-trivial softmax
        "weight": (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_(),
        "labels": labels,
    }
    if bias:
        master["bias"] = (0.1 * torch.randn(vocab, generator=gen)).requires_grad_()
    return master


def _fns(**options):
    chunk_size = options.pop("chunk_size", None)

    def ours(hidden, weight, labels, bias=None):
        return linear_cross_entropy(
            hidden, weight, labels, bias=bias, chunk_size=chunk_size, **options
        )

    def ref(hidden, weight, labels, bias=None):
        return reference.linear_cross_entropy(hidden, weight, labels, bias=bias, **options)

    return ours, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, parity):
    parity(*_fns(chunk_size=8), _master(*shape), dtype, device)


@pytest.mark.parametrize(
    "options",
    [
        {"softcap": 3.0},
        {"logit_scale": 0.25},
        {"softcap": 2.0, "logit_scale": 4.0},
        {"num_items_in_batch": 50},
        {"num_items_in_batch": torch.tensor(7)},
        {"ignore_index": 3},
    ],
    ids=str,
)
def test_options(options, device, parity):
    master = _master(12, 32, 300, bias=True, ignore_index=options.get("ignore_index", -100))
    parity(*_fns(chunk_size=5, **options), master, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_softcap_scale_bias_low_precision(dtype, device, parity):
    options = {"softcap": 2.0, "logit_scale": 4.0, "num_items_in_batch": 20}
    parity(*_fns(chunk_size=5, **options), _master(12, 32, 300, bias=True), dtype, device)


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 1000, None])
def test_chunking_does_not_change_the_result(chunk_size, device, parity):
    parity(*_fns(chunk_size=chunk_size), _master(12, 16, 300, bias=True), torch.float32, device)


def test_all_ignored_chunks_and_batch(device, parity):
    """Chunks of only ignored rows get zero gradient; an all-ignored batch gives loss 0."""
    master = _master(12, 16, 300)
    master["labels"][:8] = -100
    parity(*_fns(chunk_size=4), master, torch.float32, device)

    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(300, 16, device=device, requires_grad=True)
    labels = torch.full((6,), -100, device=device)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and reference.linear_cross_entropy(hidden, weight, labels) == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_frozen_weight_gives_only_hidden_grad(device):
    master = _master(12, 16, 300)
    hidden = master["hidden"].detach().to(device).requires_grad_()
    weight, labels = master["weight"].detach().to(device), master["labels"].to(device)
    linear_cross_entropy(hidden, weight, labels, chunk_size=5).backward()
    want = hidden.detach().clone().requires_grad_()
    reference.linear_cross_entropy(want, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, want.grad, atol=1e-6, rtol=1e-5)
    assert weight.grad is None


def test_matches_hf_causal_lm_loss_with_shifted_labels(device):
    """3-D hidden states and HF-style shifting give HF's ``ForCausalLMLoss``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 16, generator=gen).to(device)
    weight = torch.randn(300, 16, generator=gen).to(device) / 4
    labels = torch.randint(0, 300, (2, 9), generator=gen).to(device)
    labels[0, :3] = -100  # a masked prompt
    want = ForCausalLMLoss(hidden @ weight.t(), labels, 300, num_items_in_batch=torch.tensor(20))
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    got = linear_cross_entropy(hidden, weight, shifted, num_items_in_batch=20, chunk_size=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_autocast_uses_the_autocast_dtype(device):
    """fp32 weights under bf16 autocast: bf16 matmuls, fp32 gradients, close to eager autocast."""
    master = _master(16, 32, 300)
    hidden = master["hidden"].detach().to(device).requires_grad_()
    weight = master["weight"].detach().to(device).requires_grad_()
    labels = master["labels"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
        want = reference.linear_cross_entropy(hidden, weight, labels)
    exact = reference.linear_cross_entropy(hidden, weight, labels)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want_grads = torch.autograd.grad(want, (hidden, weight))
    assert grads[0].dtype == grads[1].dtype == torch.float32
    assert (loss - exact).abs() <= 2 * (want - exact).abs() + 1e-3  # bf16 logits either way
    for got, eager in zip(grads, want_grads):
        torch.testing.assert_close(got, eager, atol=2e-3, rtol=0.05)  # both round to bf16


def test_second_backward_with_retained_graph(device):
    """Gradients saved by the forward are scaled out of place, so a retained graph reruns."""
    master = _master(8, 16, 300)
    hidden = master["hidden"].detach().to(device).requires_grad_()
    weight, labels = master["weight"].detach().to(device), master["labels"].to(device)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    (first,) = torch.autograd.grad(3.0 * loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(3.0 * loss, hidden)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_auto_chunk_size():
    assert auto_chunk_size(4096, 4096, 128256) == 1024  # floor: 2^27 logits per chunk
    assert auto_chunk_size(65536, 4096, 128256) == 2048  # ratio rule: N / ceil(V / H)
    assert auto_chunk_size(10, 64, 1000) == 10  # never more than N
    assert auto_chunk_size(1, 8, 3) == 1


def test_uses_kernel(device):
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    loss = linear_cross_entropy(
        hidden, torch.randn(20, 8, device=device), torch.arange(4, device=device)
    )
    assert loss.grad_fn.name() == "LinearCrossEntropyFunctionBackward"


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(ce_mod, "use_triton", lambda *tensors: False)
    master = _master(10, 16, 50, bias=True)
    loss = linear_cross_entropy(
        master["hidden"], master["weight"], master["labels"], bias=master["bias"], softcap=5.0
    )
    assert "LinearCrossEntropyFunction" not in loss.grad_fn.name()
    want = reference.linear_cross_entropy(
        master["hidden"], master["weight"], master["labels"], bias=master["bias"], softcap=5.0
    )
    torch.testing.assert_close(loss, want, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_llama3_head(parity, monkeypatch):
    """Llama-3-8B LM head: N=4096 tokens, H=4096, V=128256, bf16, default chunking."""
    monkeypatch.setattr(ce_mod, "_MAX_BLOCK_V", 32768)
    parity(
        *_fns(), _master(4096, 4096, 128256, ignore_every=7), torch.bfloat16, torch.device("cuda")
    )


@pytest.mark.gpu
def test_gpu_memory_stays_below_full_logits(monkeypatch):
    """Peak extra memory stays below the bf16 [N, V] logits that eager would materialise."""
    monkeypatch.setattr(ce_mod, "_MAX_BLOCK_V", 32768)
    n, h, v = 8192, 4096, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    labels = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # One chunk of bf16 logits (two while the next chunk's matmul runs), grad_hidden saved and
    # its scaled copy, and slack for cuBLAS workspaces; the frozen head gets no gradient buffer
    # (an fp32 [V, H] one was 1.96 GiB here, more than the logits themselves).
    chunk = auto_chunk_size(n, h, v)
    bound = 2 * chunk * v * 2 + 2 * n * h * 2 + (64 << 20)
    assert peak < min(bound, n * v * 2), (
        f"peak {peak / 2**20:.0f} MiB vs bound {bound / 2**20:.0f} MiB "
        f"(full logits {n * v * 2 / 2**20:.0f} MiB)"
    )


def test_frozen_head_allocates_no_weight_sized_buffer(device):
    """A frozen LM head (LoRA) must not cost a [V, H] gradient buffer (2 GiB at Llama-3 scale),
    nor the full [N, V] logits: no single allocation may reach the weight's size in fp32."""
    if device.type != "cpu":
        pytest.skip("measured with the CPU profiler; the GPU test measures CUDA memory")
    n, h, v = 64, 32, 4096
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h) / h**0.5
    labels = torch.randint(0, v, (n,))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        linear_cross_entropy(hidden, weight, labels, chunk_size=16).backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < v * h * 4, f"an allocation of {largest} bytes (weight in fp32: {v * h * 4})"
    assert hidden.grad is not None and weight.grad is None
