"""GPTQLinear as a module: construction, state dict and deepcopy round trips, dtype casts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from turbotune.quant.gptq_format import dequantize_gptq
from turbotune.quant.gptq_linear import GPTQLinear, quantize_rtn


def _linear(out_f: int = 48, in_f: int = 128, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f)
    nn.init.normal_(linear.weight, std=in_f**-0.5)
    return linear


def _sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(10 * torch.log10(exact.pow(2).sum() / (approx - exact).pow(2).sum()))


@pytest.mark.parametrize("bits,sym,min_db", [(4, True, 17.0), (4, False, 18.0), (8, True, 40.0)])
def test_from_linear_quantizes_to_the_gptq_layout(bits, sym, min_db):
    """RTN through the storage: SQNR of a Gaussian weight near its theory (~6 dB per bit)."""
    linear = _linear()
    layer = GPTQLinear.from_linear(linear, bits=bits, group_size=32, sym=sym)
    assert layer.qweight.shape == (128 * bits // 32, 48) and layer.qweight.dtype == torch.int32
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (4, 48)
    dense = layer.dequantize(torch.float32)
    assert torch.equal(dense, dequantize_gptq(*layer.storage(), bits, torch.float32))
    sqnr = _sqnr_db(dense, linear.weight.detach())
    assert sqnr >= min_db, f"SQNR {sqnr:.1f} dB < {min_db}"
    assert torch.equal(layer.bias, linear.bias.detach()) and not layer.bias.requires_grad


def test_rtn_keeps_asymmetric_zeros_portable():
    """All-positive groups would get z = 0 (ambiguous in v1); RTN keeps z >= 1."""
    w = torch.rand(8, 64) + 0.1
    _, zeros, _ = quantize_rtn(w, 4, 32, sym=False)
    assert int(zeros.min()) >= 1
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_rtn(w, 4, 48)


def test_state_dict_and_deepcopy_round_trip():
    layer = GPTQLinear.from_linear(_linear(), bits=4, group_size=32, sym=False)
    keys = set(layer.state_dict())
    assert keys == {"qweight", "qzeros", "scales", "g_idx", "bias"}  # checkpoint names
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = GPTQLinear(128, 48, bits=4, group_size=32, bias=True, bias_dtype=torch.float32)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 128)
    want = layer(x)
    for other in (fresh, twin):
        assert torch.equal(other(x), want)
        for name, t in other.state_dict().items():
            assert torch.equal(t, layer.state_dict()[name]), name
    assert twin.qweight.data_ptr() != layer.qweight.data_ptr()  # a copy, not shared storage


def test_from_tensors_infers_shapes_and_group_size():
    layer = GPTQLinear.from_linear(_linear(), bits=8, group_size=32)
    again = GPTQLinear.from_tensors(*layer.storage(), bits=8)
    assert (again.in_features, again.out_features, again.group_size) == (128, 48, 32)
    assert again.bias is None and again.shape == (48, 128)
    whole = GPTQLinear.from_linear(_linear(), bits=4, group_size=-1)
    assert GPTQLinear.from_tensors(*whole.storage(), bits=4).group_size == -1
    with pytest.raises(ValueError, match="scales"):
        GPTQLinear.from_tensors(layer.qweight, layer.qzeros, layer.scales[:, :8], layer.g_idx, 8)


def test_dtype_casts_keep_fp16_scales():
    """model.to(bf16) casts the bias but not the scales (part of the quantized format)."""
    layer = GPTQLinear.from_linear(_linear(), bits=4, group_size=32)
    scales = layer.scales.clone()
    model = nn.Sequential(layer).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16 and layer.qweight.dtype == torch.int32
    model.float()
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float32
    y = model(torch.randn(2, 128, dtype=torch.float32))
    assert y.dtype == torch.float32


def test_weight_is_the_packed_storage_and_frozen():
    layer = GPTQLinear.from_linear(_linear(), bits=4, group_size=32)
    assert layer.weight is layer.qweight and not layer.weight.requires_grad
    assert list(layer.parameters()) == [layer.bias]
    assert "bits=4, group_size=32" in repr(layer)


def test_fsdp2_fully_shard_one_process():
    """FSDP2 wraps a GPTQLinear (storage replicated as buffers) and gives the unsharded dx."""
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
        model = nn.Sequential(GPTQLinear.from_linear(_linear(), 4, 32), nn.Linear(48, 8))
        ref = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = torch.randn(7, 128, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = model(x), ref(x_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
        assert model[0].scales.dtype == torch.float16
    finally:
        dist.destroy_process_group()


NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as if not installed
sys.modules["triton.language"] = None
import torch
from turbotune.ops.reference import gptq_linear_reference
from turbotune.quant.gptq_linear import GPTQLinear

torch.manual_seed(0)
layer = GPTQLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
y = layer(x)
y.float().sum().backward()
x2 = x.detach().clone().requires_grad_()
want = gptq_linear_reference(x2, layer.storage(), 4, layer.bias)
want.float().sum().backward()
assert torch.equal(y, want) and torch.equal(x.grad, x2.grad)
print("ok")
"""


def test_gptq_linear_works_without_triton():
    """On a machine without Triton the layer runs the eager reference (forward and dx)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", NO_TRITON], env=dict(os.environ), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
