"""MoE kernels on the GPU at real shapes (bf16): each backend's error against an fp32 reference
at most twice the error of the eager bf16 per-expert loop (the flash-attention rule), for the
output and every gradient (input, routing weights, both expert stacks)."""

from __future__ import annotations

import pytest
import torch

from turbotune.moe import moe_experts, route
from turbotune.moe.reference import moe_experts_reference

pytestmark = pytest.mark.gpu

# (hidden, intermediate, experts, top-k, tokens): Mixtral-8x7B and Qwen3-30B-A3B layers.
SHAPES = {"mixtral": (4096, 14336, 8, 2, 1024), "qwen3": (2048, 768, 128, 8, 2048)}


def _inputs(shape, seed: int = 0):
    hidden, inter, experts, k, tokens = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen)
    router = torch.randn(experts, hidden, device="cuda", generator=gen) * hidden**-0.5
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5
    grad = torch.randn(tokens, hidden, device="cuda", generator=gen)
    routed = route(x, router, k)  # one fp32 routing for every run: no top-k flips between runs
    return x, routed.index, routed.weights, gate_up, down, grad


def _run(fn, x, index, weights, gate_up, down, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weights, gate_up, down)]
    xs, ws, gu, dn = leaves
    out = fn(xs, index, ws, gu, dn)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "grouped_mm", "mm_loop"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bf16_error_within_twice_eager(name: str, backend: str) -> None:
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    args = _inputs(SHAPES[name])
    ref = _run(moe_experts_reference, *args, torch.float32)
    eager = _run(moe_experts_reference, *args, torch.bfloat16)
    ours = _run(lambda *a: moe_experts(*a, backend=backend), *args, torch.bfloat16)
    for what, r, e, o in zip(("out", "grad_x", "grad_weights", "grad_gate_up", "grad_down"),
                             ref, eager, ours, strict=True):  # fmt: skip
        err_eager = (e - r).abs().max().item()
        err_ours = (o - r).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-6, (
            f"{name}/{backend} {what}: max abs err {err_ours:.3e} vs eager bf16 {err_eager:.3e}"
            f" (mean {(o - r).abs().mean():.3e})"
        )


def test_nf4_stacks_on_gpu() -> None:
    """QLoRA stacks at the Qwen3 shape: dequantized on the GPU, same result as dense weights."""
    pytest.importorskip("bitsandbytes")
    from turbotune.moe.quant import NF4ExpertStack

    x, index, weights, gate_up, down, grad = _inputs(SHAPES["qwen3"])
    gu, dn = NF4ExpertStack(gate_up.bfloat16()), NF4ExpertStack(down.bfloat16())
    xb = x.bfloat16().requires_grad_()
    out = moe_experts(xb, index, weights, gu, dn)
    out.backward(grad.bfloat16())
    xd = x.bfloat16().requires_grad_()
    want = moe_experts(xd, index, weights, gu.dequantize(), dn.dequantize())
    want.backward(grad.bfloat16())
    assert torch.equal(out, want) and torch.equal(xb.grad, xd.grad)


@pytest.mark.parametrize("backend", ["triton", "grouped_mm", "mm_loop"])
def test_empty_and_crowded_experts(backend: str) -> None:
    """Skewed routing on the GPU: experts without tokens get zero weight gradients, an expert
    with most tokens spans many blocks; bf16 vs the fp32 loop within twice the bf16 loop."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens, hidden, inter, experts = 1000, 256, 384, 16
    scores = torch.rand(tokens, experts, device="cuda", generator=gen)
    scores[:, 0] += 1.0
    scores[:, 8:] -= 2.0  # experts 8.. never chosen
    index = scores.topk(2, dim=-1).indices
    weights = torch.rand(tokens, 2, device="cuda", generator=gen)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.05
    down = torch.randn(experts, hidden, inter, device="cuda", generator=gen) * 0.05
    grad = torch.randn(tokens, hidden, device="cuda", generator=gen)
    args = (x, index, weights, gate_up, down, grad)
    ref = _run(moe_experts_reference, *args, torch.float32)
    eager = _run(moe_experts_reference, *args, torch.bfloat16)
    ours = _run(lambda *a: moe_experts(*a, backend=backend), *args, torch.bfloat16)
    assert ours[3][8:].abs().max() == 0 and ours[4][8:].abs().max() == 0
    for what, r, e, o in zip(("out", "grad_x", "grad_weights", "grad_gate_up", "grad_down"),
                             ref, eager, ours, strict=True):  # fmt: skip
        err_eager, err_ours = (e - r).abs().max().item(), (o - r).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-6, f"{what}: {err_ours:.3e} vs eager {err_eager:.3e}"


@pytest.mark.parametrize(
    ("backend", "rank"),
    [("grouped_mm", 16), ("grouped_mm", 4), ("triton", 16), ("mm_loop", 16), ("mm_loop", 4)],
)
def test_expert_lora_bf16(backend: str, rank: int) -> None:
    """Per-expert LoRA as grouped rank-r products at the Qwen3 shape, bf16: error vs the fp32
    merged stacks within twice that of the bf16 loop on merged stacks (output, input and factor
    gradients). Rank 4 exercises the fallback for strides grouped_mm cannot take."""
    from turbotune.moe.experts import ExpertLoRA

    x, index, weights, gate_up, down, grad = _inputs(SHAPES["qwen3"])
    experts, hidden, inter = down.shape
    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = ((2 * inter, rank), (rank, hidden), (hidden, rank), (rank, inter))
    factors = [torch.randn(experts, *s, device="cuda", generator=gen) * 0.05 for s in shapes]

    def run(grouped: bool, dtype: torch.dtype):
        # Fresh leaves: ``.to(float32)`` of an fp32 tensor is the tensor itself, and making it
        # require grad would turn the later bf16 copies into non-leaves without ``.grad``.
        xs = x.to(dtype).detach().clone().requires_grad_()
        fs = [f.to(dtype).detach().clone().requires_grad_() for f in factors]
        gu, dn, w = gate_up.to(dtype), down.to(dtype), weights.to(dtype)
        if grouped:
            out = moe_experts(xs, index, w, gu, dn, backend=backend,
                              gate_up_lora=ExpertLoRA(fs[0], fs[1], 2.0),
                              down_lora=ExpertLoRA(fs[2], fs[3], 2.0))  # fmt: skip
        else:
            out = moe_experts_reference(xs, index, w, gu + 2.0 * fs[0] @ fs[1],
                                        dn + 2.0 * fs[2] @ fs[3])  # fmt: skip
        out.backward(grad.to(dtype))
        return [out.detach().float(), xs.grad.float()] + [f.grad.float() for f in fs]

    ref, eager, ours = (
        run(False, torch.float32),
        run(False, torch.bfloat16),
        run(True, torch.bfloat16),
    )
    for i, (r, e, o) in enumerate(zip(ref, eager, ours, strict=True)):
        err_eager, err_ours = (e - r).abs().max().item(), (o - r).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-6, f"[{i}] {err_ours:.3e} vs eager {err_eager:.3e}"


def test_auto_backend_rule_on_gpu() -> None:
    """``auto``: the per-expert loop at the Mixtral shape from 8192 tokens, grouped_mm at the
    Qwen3 shape and during CUDA graph capture (the loop reads counts on the host)."""
    from turbotune.moe import resolve_backend

    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs torch._grouped_mm on sm90+")
    x = torch.zeros(8192, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", x, 8, 2) == "mm_loop"
    assert resolve_backend("auto", x, 128, 8) == "grouped_mm"
    assert resolve_backend("auto", x[:1024], 8, 2) == "grouped_mm"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen = resolve_backend("auto", x, 8, 2)
        y = x + 1
    graph.replay()
    assert chosen == "grouped_mm" and y.float().mean() == 1


@pytest.mark.parametrize("async_counts", [True, False])
def test_mm_loop_forward_never_blocks_the_stream(async_counts: bool) -> None:
    """The per-expert loop's row counts reach the host by a non-blocking copy and an event: no
    stream-synchronizing call in its forward or backward (``set_sync_debug_mode("error")`` raises
    on one, as the blocking ``tolist()`` of ``ASYNC_COUNTS = False`` shows), and both ways give
    the same bits."""
    from turbotune.moe import plan

    x, index, weights, gate_up, down, grad = _inputs(SHAPES["mixtral"])
    leaves = [t.bfloat16().requires_grad_() for t in (x, weights, gate_up, down)]
    saved = plan.ASYNC_COUNTS
    plan.ASYNC_COUNTS = async_counts
    try:
        want = moe_experts(
            *_detached(leaves, index), backend="mm_loop"
        )  # warm: allocator, autotune
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = moe_experts(leaves[0], index, *leaves[1:], backend="mm_loop")
            out.backward(grad.bfloat16())
        except RuntimeError as error:
            assert not async_counts, f"the async path synchronized: {error}"
            assert "synchroniz" in str(error)
            return
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        plan.ASYNC_COUNTS = saved
    assert async_counts, "the blocking tolist() was not caught: this test cannot tell the paths"
    assert torch.equal(out, want)


def _detached(leaves, index):
    x, weights, gate_up, down = (t.detach() for t in leaves)
    return x, index, weights, gate_up, down


@pytest.mark.parametrize(("tokens", "experts", "k"), [(8192, 8, 2), (32768, 16, 2), (5000, 3, 1)])
def test_plan_kernel_on_gpu(tokens: int, experts: int, k: int) -> None:
    """The one-launch counting sort equals the stable sort at real sizes (compiled, not
    interpreted), skewed routing included."""
    from turbotune.moe.plan import plan_experts, plan_experts_reference

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    scores = torch.rand(tokens, experts, device="cuda", generator=gen)
    scores[: tokens // 2, 0] += 1.0  # expert 0 crowded
    index = scores.topk(k, dim=-1).indices
    got, want = plan_experts(index, experts), plan_experts_reference(index, experts)
    assert got.token_rows is not None
    for name in ("order", "counts", "ends", "row_of_slot"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.tokens, want.order // k)
