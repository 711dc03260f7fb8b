"""GPTQ storage packed for FSDP2 (``distributed.gptq``): one process, no sharding. The packed layer
is the same layer: identical storage views, dequantized weight, forward and input gradient; its
bytes survive dtype casts and re-packing; unpacking restores the checkpoint buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turbotune.distributed.gptq import (
    GPTQPackedLayout,
    make_gptq_shardable,
    pack_gptq_layer,
    unpack_gptq,
)
from turbotune.quant.gptq_linear import GPTQLinear

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [(4, 32, 64, 96), (3, 32, 64, 64), (2, -1, 32, 48), (8, 16, 48, 40)]  # bits, group, in, out


def _layer(bits: int, group: int, n_in: int, n_out: int, bias: bool = False) -> GPTQLinear:
    torch.manual_seed(bits)
    return GPTQLinear.from_linear(nn.Linear(n_in, n_out, bias=bias), bits=bits, group_size=group)


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gather", [torch.bfloat16, torch.float32])
def test_packed_layer_dequantizes_exactly_as_before(case, gather):
    layer = _layer(*case)
    before = [t.clone() for t in layer.storage()]
    dense = layer.dequantize(torch.float32)
    pack_gptq_layer(layer, gather)
    assert not layer._buffers and layer.packed.dtype == gather and not layer.packed.requires_grad
    assert layer.packed_layout.nbytes % 16 == 0
    assert all(offset % 16 == 0 for offset, _, _ in layer.packed_layout.sections)
    for got, ref in zip(layer.storage(), before):
        assert got.dtype == ref.dtype and torch.equal(got, ref)
        assert got.untyped_storage().data_ptr() == layer.packed.untyped_storage().data_ptr()
    packed_dense = layer.dequantize(torch.float32)
    assert torch.equal(packed_dense, dense), _diff(packed_dense, dense)


@pytest.mark.parametrize("case", CASES[:2])
def test_packed_forward_and_input_gradient_match(case):
    ref_layer, layer = _layer(*case, bias=True), _layer(*case, bias=True)
    make_gptq_shardable(layer, torch.bfloat16)
    x = torch.randn(3, 5, case[2], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref_layer(x), layer(x2)
    assert torch.equal(y, y_ref), _diff(y, y_ref)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    assert torch.equal(x2.grad, x.grad), _diff(x2.grad, x.grad)


def test_casts_keep_the_packed_bytes_and_names_stay_readable():
    layer = _layer(4, 32, 64, 96)
    qweight = layer.qweight.clone()
    model = nn.Sequential(layer)
    assert make_gptq_shardable(model, torch.float32) == 1
    model.to(torch.bfloat16)  # would convert packed bytes: the layer keeps their dtype
    assert layer.packed.dtype == torch.float32
    assert torch.equal(layer.qweight, qweight)  # the checkpoint names read the packed bytes
    assert layer.weight is layer.packed
    assert [n for n, _ in model.named_parameters()] == ["0.packed"]


def test_repack_and_unpack_round_trip():
    layer = _layer(3, 32, 64, 64)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    pack_gptq_layer(layer, torch.float32)
    pack_gptq_layer(layer, torch.bfloat16)  # same bytes, another dtype
    assert layer.packed.dtype == torch.bfloat16
    unpack_gptq(layer)
    assert "packed" not in layer._parameters and layer.packed_layout is None
    got = layer.state_dict()
    assert got.keys() == state.keys()
    for k in state:
        assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]), k


def test_layout_views_any_gather_dtype():
    tensors = (torch.arange(6, dtype=torch.int32).view(2, 3), torch.ones(3, dtype=torch.float16))
    layout = GPTQPackedLayout.of(tensors)
    assert [s[0] for s in layout.sections] == [0, 32] and layout.nbytes == 48  # 24 B -> 32
    raw = torch.zeros(48, dtype=torch.uint8)
    raw[:24].view(torch.int32)[:] = tensors[0].flatten()
    raw[32:38].view(torch.float16)[:] = tensors[1]
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        a, b = layout.views(raw.view(dtype))
        assert torch.equal(a, tensors[0]) and torch.equal(b, tensors[1])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 2048])  # the fused kernels; the dequantize + matmul path
def test_packed_layer_on_gpu_matches_unpacked(rows):
    """The Triton kernels read the packed views (offset, 16-byte aligned pointers) like buffers:
    dequantized weight bit-identical, forward and input gradient equal up to split-K order."""
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False, device="cuda")
    ref = GPTQLinear.from_linear(linear, bits=4, group_size=128)
    layer = GPTQLinear.from_linear(linear, bits=4, group_size=128)
    make_gptq_shardable(layer, torch.bfloat16)
    w_ref, w = ref.dequantize(torch.bfloat16), layer.dequantize(torch.bfloat16)
    assert torch.equal(w, w_ref), _diff(w, w_ref)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), layer(x2)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    scale = y_ref.float().abs().max().item()
    assert (y.float() - y_ref.float()).abs().max() <= 1e-2 * scale, _diff(y, y_ref)
    scale = x.grad.float().abs().max().item()
    assert (x2.grad.float() - x.grad.float()).abs().max() <= 1e-2 * scale, _diff(x2.grad, x.grad)
