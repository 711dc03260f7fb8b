"""HQQLinear (quant/hqq_linear.py) and LoRA on HQQ bases, layer by layer.

* the layer's forward and input gradient against ``x W^T + b`` with ``W`` its fp32 dequantization
  (the flash-attention rule for bf16/fp16: at most 2x the error of the eager low-precision run);
* no dense weight is saved for backward; dtype casts, FSDP2, no-Triton, deep copies;
* turbotune's fused LoRA ops (``ops/lora.py``) on HQQ bases against the unfused LoRA layers:
  outputs, input gradient and every LoRA gradient, for one projection, a q/k/v group and a gated
  MLP (GPU: Llama-3.1-8B shapes in bf16).

The loader plugin and training runs: test_hqq_plugin.py. Kernels run through the Triton
interpreter on CPU (tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbotune.adapters.lora import LoRALinear
from turbotune.ops.lora import lora_mlp, lora_projections
from turbotune.patches.forwards import projection_of
from turbotune.quant.hqq_linear import HQQLinear

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def eager_ops(monkeypatch):
    """Model-level runs take the eager op references on CPU (the interpreter would take minutes);
    the Triton dequantizer itself is checked against them in test_hqq.py."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _hqq(n_out: int, n_in: int, *, bias: bool = False, seed: int = 0, group: int = 32):
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    if bias:
        nn.init.normal_(linear.bias, 0.0, 0.1)
    return HQQLinear.from_linear(linear, 4, group, compute_dtype=torch.float32)


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}"


# ---- the layer ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_input_grad_match_dequantized_reference(dtype):
    layer = _hqq(77, 123, bias=True)  # prime-ish shapes, a short last group (123 = 3 * 32 + 27)
    weight, bias = layer.dequantize(torch.float32), layer.bias.detach().float()
    gen = torch.Generator().manual_seed(1)
    x_master = torch.randn(3, 5, 123, generator=gen).to(dtype).float()
    grad = torch.randn(3, 5, 77, generator=gen)

    def run(fn, run_dtype):
        x = x_master.to(run_dtype).detach().requires_grad_()
        y = fn(x)
        y.backward(grad.to(y.dtype))
        return y.detach().float(), x.grad.float()

    ref = run(lambda x: F.linear(x, weight, bias), torch.float32)
    eager = run(lambda x: F.linear(x, weight.to(dtype), bias.to(dtype)), dtype)
    ours = run(layer, dtype)
    for name, got, want, low in zip(("output", "grad_x"), ours, ref, eager):
        eager_err = (low - want).abs().max().item()
        bound = 2 * eager_err + 1e-5 * max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= bound, (
            f"{dtype} {name}: {_diff(got, want)}, bound {bound:.3e}"
        )


def test_backward_recomputes_the_weight_instead_of_saving_it():
    layer = _hqq(64, 96)
    saved = []
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        y = layer(x)
    y.sum().backward()
    assert (64, 96) not in saved and (96, 64) not in saved, saved
    assert torch.allclose(x.grad, layer.dequantize(torch.float32).sum(0).expand(4, 96))


def test_autocast_runs_in_the_autocast_dtype():
    layer = _hqq(16, 64)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.bfloat16()))


def test_layer_is_a_dequantizable_weight_source():
    from turbotune.quant.weights import Dequantizable, dense_weight, weight_shape

    layer = _hqq(40, 64)
    assert isinstance(layer, Dequantizable) and weight_shape(layer) == (40, 64)
    assert torch.equal(dense_weight(layer, torch.bfloat16), layer.dequantize(torch.bfloat16))
    assert all(not p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} == {"W_q", "scale", "zero"}


# ---- fused LoRA ops on HQQ bases vs the unfused LoRA layers ----


def _lora(base: HQQLinear, seed: int) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(base, r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B["default"].weight, 0.0, 0.05)  # B = 0 would hide its terms
    return layer


def _lora_params(layers) -> list[torch.Tensor]:
    return [
        p
        for layer in layers
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ]


def _run(fn, layers, x_master, grads):
    x = x_master.clone().requires_grad_()
    for p in _lora_params(layers):
        p.grad = None
    outs = fn(x)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return (
        [o.detach().float() for o in outs]
        + [x.grad.float()]
        + [p.grad.clone() for p in _lora_params(layers)]
    )


def _assert_fused_matches(fused, unfused, rtol, what):
    assert len(fused) == len(unfused)
    for i, (got, want) in enumerate(zip(fused, unfused)):
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= rtol * max(scale, 1e-6), (
            f"{what} tensor {i}: {_diff(got, want)} (max |ref| {scale:.3e})"
        )


def test_fused_lora_projections_on_hqq_bases_match_unfused():
    """q, k, v sharing an input (one stacked dequantization) and o alone: forward, dx, dA, dB."""
    qkv = [_lora(_hqq(n, 48, seed=i), seed=10 + i) for i, n in enumerate((64, 32, 32))]
    projections = [projection_of(layer) for layer in qkv]
    assert all(p is not None for p in projections), "an HQQ base must be fusable"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 48, generator=gen)
    grads = [torch.randn(2, 5, n, generator=gen) for n in (64, 32, 32)]
    unfused = _run(lambda x: [layer(x) for layer in qkv], qkv, x, grads)
    fused = _run(
        lambda x: lora_projections(x, [projection_of(layer) for layer in qkv]), qkv, x, grads
    )
    _assert_fused_matches(fused, unfused, 1e-5, "q/k/v fp32")
    single = [qkv[0]]
    unfused = _run(lambda x: [qkv[0](x)], single, x, grads[:1])
    fused = _run(lambda x: lora_projections(x, [projection_of(qkv[0])]), single, x, grads[:1])
    _assert_fused_matches(fused, unfused, 1e-5, "single fp32")


def test_fused_lora_mlp_on_hqq_bases_matches_unfused(eager_ops):
    gate, up = _lora(_hqq(96, 64, seed=1), 11), _lora(_hqq(96, 64, seed=2), 12)
    down = _lora(_hqq(64, 96, seed=3), 13)
    layers = [gate, up, down]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 64, generator=gen)
    grads = [torch.randn(3, 7, 64, generator=gen)]
    unfused = _run(lambda x: [down(F.silu(gate(x)) * up(x))], layers, x, grads)
    fused = _run(lambda x: [lora_mlp(x, *(projection_of(m) for m in layers))], layers, x, grads)
    _assert_fused_matches(fused, unfused, 1e-5, "mlp fp32")


def test_deepcopy_and_state_dict_round_trip():
    layer = _hqq(24, 64, bias=True)
    clone = copy.deepcopy(layer)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), layer(x))


# ---- GPU, real shapes ----


@pytest.mark.gpu
def test_hqq_linear_real_shape_gpu():
    """Llama-3.1-8B up projection (4096 -> 14336), bf16: output and input gradient within 2x the
    error of an eager bf16 run against the fp32 dequantized reference."""
    torch.manual_seed(0)
    linear = nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, 0.0, 0.02)
    layer = HQQLinear.from_linear(linear, 4, 64)
    weight = layer.dequantize(torch.float32)
    x_master = torch.randn(2048, 4096, device="cuda").bfloat16().float()
    grad = torch.randn(2048, 14336, device="cuda")

    def run(fn, dtype):
        x = x_master.to(dtype).detach().clone().requires_grad_()  # not x_master itself (fp32)
        y = fn(x)
        y.backward(grad.to(dtype))
        return y.float(), x.grad.float()

    ref = run(lambda x: x @ weight.t(), torch.float32)
    eager = run(lambda x: x @ weight.bfloat16().t(), torch.bfloat16)
    ours = run(layer, torch.bfloat16)
    for name, got, want, low in zip(("output", "grad_x"), ours, ref, eager):
        bound = 2 * (low - want).abs().max().item() + 1e-5 * want.abs().max().item()
        assert (got - want).abs().max().item() <= bound, (
            f"{name}: {_diff(got, want)}, bound {bound:.3e}"
        )
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    layer.dequantize(torch.bfloat16)
    start.record()
    for _ in range(20):
        layer.dequantize(torch.bfloat16)
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / 20
    print(f"HQQ 4-bit dequantize 14336x4096 -> bf16: {ms:.3f} ms")


@pytest.mark.gpu
def test_fused_lora_on_hqq_real_shapes_gpu():
    """q/k/v of Llama-3.1-8B (4096 -> 4096, 1024, 1024) on HQQ bases, bf16: the fused group
    against the unfused LoRA layers, every output and gradient within 2x the unfused error
    against an fp32 run of the unfused layers."""
    shapes = (4096, 1024, 1024)
    torch.manual_seed(0)
    layers = []
    for i, n in enumerate(shapes):
        linear = nn.Linear(4096, n, bias=False, device="cuda", dtype=torch.bfloat16)
        nn.init.normal_(linear.weight, 0.0, 0.02)
        base = HQQLinear.from_linear(linear, 4, 64)
        layers.append(_lora(base, seed=20 + i))
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 512, 4096, device="cuda", generator=gen).bfloat16().float()
    grads = [torch.randn(2, 512, n, device="cuda", generator=gen) for n in shapes]
    ref = _run(lambda x: [layer(x) for layer in layers], layers, x, grads)
    eager = _run(lambda x: [layer(x) for layer in layers], layers, x.bfloat16(), grads)
    fused = _run(
        lambda x: lora_projections(x, [projection_of(layer) for layer in layers]),
        layers, x.bfloat16(), grads,
    )  # fmt: skip
    for i, (got, want, low) in enumerate(zip(fused, ref, eager)):
        # the project's parity rule: 2x the eager error plus one bf16 ulp at the largest value
        # (the fused op keeps the LoRA products in bf16 where the unfused layer runs them in fp32)
        scale = want.abs().max().item()
        bound = 2 * (low.float() - want.float()).abs().max().item() + 2**-7 * scale
        err = (got.float() - want.float()).abs().max().item()
        assert err <= bound, f"tensor {i}: {_diff(got, want)}, bound {bound:.3e}"


def test_dtype_casts_keep_the_quantized_format():
    """``model.half()`` moves nothing in the storage (bytes viewed as bf16 must not be converted),
    the bias follows the cast, and the layer computes what it did."""
    torch.manual_seed(0)
    layer = HQQLinear.from_linear(nn.Linear(64, 24), 4, 32, storage_dtype=torch.bfloat16)
    storage = {n: getattr(layer, n).clone() for n in ("W_q", "scale", "zero")}
    x = torch.randn(3, 64)
    want = layer(x)
    model = nn.Sequential(layer).half()
    for name, before in storage.items():
        after = getattr(layer, name)
        # bytes compared as bytes: packed codes viewed as bf16 include NaN patterns
        assert after.dtype == before.dtype, name
        assert torch.equal(after.view(torch.uint8), before.view(torch.uint8)), name
    assert layer.bias.dtype == torch.float16
    model.float()
    assert torch.allclose(layer(x), want, atol=1e-3), _diff(layer(x), want)


def test_fsdp2_fully_shard_one_process():
    """FSDP2 shards the storage like any parameter; the weight re-gathered for backward gives
    the unsharded dx (storage in the compute dtype, as mixed precision needs)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        hqq = HQQLinear.from_linear(
            nn.Linear(128, 48), 4, 32, compute_dtype=torch.float32, storage_dtype=torch.float32
        )
        model = nn.Sequential(hqq, nn.Linear(48, 8))
        ref = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model[0].W_q).__name__ == "DTensor"  # sharded as a parameter
        x = torch.randn(7, 128, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = model(x), ref(x_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert torch.equal(y, y_ref), _diff(y, y_ref)
        assert torch.equal(x.grad, x_ref.grad), _diff(x.grad, x_ref.grad)
    finally:
        dist.destroy_process_group()


NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as if not installed
sys.modules["triton.language"] = None
import torch
from turbotune.quant.hqq_linear import HQQLinear

torch.manual_seed(0)
layer = HQQLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, compute_dtype=torch.float32)
x = torch.randn(3, 64, requires_grad=True)
layer(x).sum().backward()
w = layer.quantized().dequantize_eager(torch.float32)
x2 = x.detach().clone().requires_grad_()
(x2 @ w.t() + layer.bias).sum().backward()
assert torch.equal(layer(x), x @ w.t() + layer.bias) and torch.equal(x.grad, x2.grad)
print("ok")
"""


def test_hqq_linear_works_without_triton():
    """Without Triton (even with TRITON_INTERPRET=1 set) the layer runs the eager reference."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", NO_TRITON], env=dict(os.environ), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_round_trip_linears_gives_the_base_training_saw():
    """For merging: a dense model whose linears hold exactly what HQQLinear computes with."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbotune.quant.hqq_linear import quantize_linears, round_trip_linears

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    dense = LlamaForCausalLM(config)
    quantized = copy.deepcopy(dense)
    assert quantize_linears(quantized, bits=4, group_size=32, compute_dtype=torch.float32) == 7
    assert round_trip_linears(dense, bits=4, group_size=32) == 7
    layer = quantized.model.layers[0].mlp.up_proj
    assert torch.equal(dense.model.layers[0].mlp.up_proj.weight, layer.dequantize(torch.float32))
    ids = torch.randint(0, 64, (2, 9))
    assert torch.allclose(dense(ids).logits, quantized(ids).logits, atol=1e-5)
