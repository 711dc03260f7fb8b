"""4-bit dequantization (ops/nf4.py) against bitsandbytes itself, and the weight-source protocol.

bitsandbytes' CPU backend is the oracle: ``bitsandbytes.functional.dequantize_4bit`` must agree
with both our eager reference and our Triton kernel (run through the interpreter on CPU). Values
are compared with ``torch.equal`` (so ``-0.0 == 0.0``: bitsandbytes' odd-shape CPU fallback
writes +0 where its own FP4 table holds -0).
"""

from __future__ import annotations

import itertools

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

import turbotune.ops.nf4 as nf4_mod
from turbotune.ops._triton import interpreting, use_triton
from turbotune.ops.nf4 import dequantize_4bit_launch, dequantize_nf4
from turbotune.ops.reference import (
    blockwise_absmax_reference,
    code_table_4bit,
    dequantize_4bit_reference,
)
from turbotune.quant.weights import Packed4bitWeight, dense_weight

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (77, 123): odd element count, last byte half padding, partial last block; (3, 5): one
# partial block; (64, 128): the even path of bitsandbytes' C kernel; (130, 96): > 1 kernel block.
SHAPES = ((77, 123), (3, 5), (64, 128), (130, 96))
STORAGES = (torch.uint8, torch.bfloat16, torch.float32)


def _quantize(shape, dtype, quant_type, nested, blocksize, storage, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    return bnbf.quantize_4bit(
        w,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )


def _diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    d = (actual.float() - expected.float()).abs()
    where = divmod(int(d.argmax()), actual.shape[-1]) if actual.dim() == 2 else int(d.argmax())
    return f"max abs diff {d.max().item():.3g} at {where}, mean {d.mean().item():.3g}"


def _assert_within_nested_scale_rounding(actual, expected, quant_state) -> None:
    """Double-quantized weights on GPU: equal up to the rounding of the block scale.

    bitsandbytes' CUDA path rounds the nested scale twice (``code2[q] * absmax2``, then
    ``+ offset`` in a separate kernel); our kernel computes it in one expression that the
    compiler may contract into one FMA (one rounding). The two scales then differ by a few fp32
    ulps of the *scale* (more than one when ``code2[q] * absmax2`` is larger than the scale and
    cancels against the offset), and ``w = code4 * scale`` carries that difference whatever the
    size of ``code4``: so the bound is relative to the block's scale, not to each element
    (``2^-20 * scale``, 8 fp32 ulps of it), plus one ulp of the output dtype for the final
    rounding. A wrong nibble, code or block index errs by ~5% of the scale.
    """
    n, blocksize = expected.numel(), quant_state.blocksize
    scale = blockwise_absmax_reference(quant_state).abs()
    scale = scale.repeat_interleave(blocksize)[:n].reshape(expected.shape).to(expected.device)
    bound = 2.0**-20 * scale + torch.finfo(expected.dtype).eps * expected.float().abs()
    err = (actual.float() - expected.float()).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{tuple(expected.shape)}: {int(bad.sum())} beyond 2^-20 of the block scale; "
        f"{_diff(actual, expected)}; max err/scale {(err / scale.clamp_min(1e-30)).max():.3g}"
    )


def _assert_within_bf16_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal, or one bf16 ulp apart (same sign: adjacent bit patterns)."""
    a, e = actual.view(torch.int16).int(), expected.view(torch.int16).int()
    ok = (actual == expected) | (((a - e).abs() <= 1) & ((a < 0) == (e < 0)))
    assert bool(ok.all()), f"{int((~ok).sum())} values beyond 1 ulp; {_diff(actual, expected)}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_match_bitsandbytes(quant_type):
    ours = code_table_4bit(quant_type)
    theirs = bnbf.get_4bit_type(quant_type, device="cpu")
    assert torch.equal(ours, theirs), _diff(ours, theirs)


CASES = list(itertools.product(["nf4", "fp4"], [False, True], [64, 128], DTYPES))


@pytest.mark.parametrize("quant_type,nested,blocksize,dtype", CASES)
def test_reference_matches_bitsandbytes(quant_type, nested, blocksize, dtype):
    for i, shape in enumerate(SHAPES):
        storage = STORAGES[i % len(STORAGES)]
        packed, state = _quantize(shape, dtype, quant_type, nested, blocksize, storage, seed=i)
        expected = bnbf.dequantize_4bit(packed, state)
        assert expected.shape == shape and expected.dtype == dtype
        ref = dequantize_4bit_reference(packed, state)
        assert ref.dtype == dtype and torch.equal(ref, expected), f"{shape}: {_diff(ref, expected)}"


@pytest.mark.parametrize("quant_type,nested,blocksize,dtype", CASES)
def test_kernel_matches_bitsandbytes(device, quant_type, nested, blocksize, dtype):
    """Quantized by bitsandbytes on CPU, dequantized by our kernel on ``device``."""
    for i, shape in enumerate(SHAPES):
        storage = STORAGES[i % len(STORAGES)]
        packed, state = _quantize(shape, dtype, quant_type, nested, blocksize, storage, seed=i)
        expected = bnbf.dequantize_4bit(packed, state).to(device)
        state.to(device)
        packed = packed.to(device)
        assert use_triton(packed)
        got = dequantize_nf4(packed, state)
        assert got.shape == shape and got.dtype == dtype
        got32 = dequantize_nf4(packed, state, torch.float32)
        _assert_matches(got32, got, expected, state)


def _assert_matches(got32, got, expected, state) -> None:
    """Our fp32 output ``got32`` and ``expected.dtype`` output ``got`` against bitsandbytes'."""
    shape, dtype = tuple(expected.shape), expected.dtype
    if state.state2 is not None and got.is_cuda:
        _assert_within_nested_scale_rounding(got32.to(dtype), expected, state)
        return
    # fp32 output is the kernel's arithmetic before any rounding: it must be exact.
    assert torch.equal(got32.to(dtype), expected), f"{shape}: {_diff(got32, expected)}"
    if dtype == torch.bfloat16 and interpreting():
        # The Triton interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
        # even, so here the kernel may sit 1 ulp off; on GPU it must be exact.
        _assert_within_bf16_ulp(got, expected)
    else:
        assert torch.equal(got, expected), f"{shape}: {_diff(got, expected)}"


def test_dequantize_params4bit_and_linear4bit():
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(123, 77, bias=True, quant_type="nf4", quant_storage=torch.bfloat16)
    dense = lin.weight.data.clone()
    lin = lin.to("cpu")  # moving to a device is what quantizes a Linear4bit
    assert lin.weight.bnb_quantized
    expected = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    # Quantization actually happened: close to, but not equal to, the dense weight.
    assert not torch.equal(expected, dense)
    assert (expected - dense).abs().max() < 0.5 * dense.abs().max()

    for source in (lin, lin.weight, Packed4bitWeight(lin.weight.data, lin.weight.quant_state)):
        got = dense_weight(source, torch.float32)
        assert got.shape == (77, 123) and got.dtype == torch.float32
        assert torch.equal(got, expected), f"{type(source).__name__}: {_diff(got, expected)}"
    assert torch.equal(dequantize_nf4(lin.weight, dtype=torch.float32), expected)


def test_dense_weight_of_plain_sources():
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    got = dense_weight(lin, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, lin.weight.detach().bfloat16())
    assert torch.equal(dense_weight(lin.weight, torch.float32), lin.weight.detach())

    class Scaled:  # any object with .dequantize(dtype) is a weight source (GPTQ, HQQ...)
        def __init__(self, w):
            self.w = w

        def dequantize(self, dtype):
            return (2 * self.w).to(dtype)

    assert torch.equal(dense_weight(Scaled(lin.weight.detach()), torch.float32), 2 * lin.weight)
    with pytest.raises(TypeError, match="weight source"):
        dense_weight("not a weight", torch.float32)


def test_missing_quant_state_is_an_error():
    with pytest.raises(ValueError, match="quant_state"):
        dequantize_nf4(torch.zeros(8, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "quant_type,nested", list(itertools.product(["nf4", "fp4"], [False, True]))
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_bitsandbytes_cuda(quant_type, nested, dtype):
    """Llama-8B MLP shape on GPU: exact, except that a nested scale may round differently."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape, blocksize in (((14336, 4096), 64), ((77, 123), 128)):
        w = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
        )
        expected = bnbf.dequantize_4bit(packed, state)
        got = dequantize_4bit_launch(packed.view(torch.uint8).reshape(-1), state, dtype)
        if not nested:
            assert torch.equal(got, expected), f"{shape}: {_diff(got, expected)}"
            continue
        _assert_within_nested_scale_rounding(got, expected, state)


def test_launch_facts_cache_follows_a_replaced_state(device):
    """The per-weight launch facts are cached on the QuantState; replacing a piece of the state
    (as ``QuantState.to`` or a reload does) must be seen by the next dequantization."""
    packed, state = _quantize((64, 96), torch.float32, "nf4", True, 64, torch.uint8)
    state.to(device)
    packed = packed.to(device)
    before = dequantize_nf4(packed, state, torch.float32)
    assert torch.equal(before.cpu(), dequantize_4bit_reference(packed.cpu(), _cpu(state)))
    state.offset = state.offset + 0.5  # a new tensor object: every block scale grows by 0.5
    after = dequantize_nf4(packed, state, torch.float32)
    code = code_table_4bit("nf4", device)
    nibbles = torch.stack((packed.view(-1) >> 4, packed.view(-1) & 0xF), 1).reshape(64, 96)
    expected_shift = code[nibbles.long()] * 0.5
    diff = (after - before - expected_shift).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff:.3g} after replacing the nested offset"


def _cpu(state):
    import copy

    cpu = copy.deepcopy(state)
    cpu.to("cpu")
    return cpu


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("source_kind", ["params4bit", "packed", "dense"])
def test_dequantize_into_a_block_of_a_larger_buffer(source_kind, layout):
    """``out=`` writes one weight into a row block (q, k, v stacked) or a column block
    (``[W | extra columns]``) of a larger buffer and leaves the rest alone."""
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(2100, 40, bias=False, quant_type="nf4").to("cpu")
    source = {
        "params4bit": lin.weight,
        "packed": Packed4bitWeight(lin.weight.data, lin.weight.quant_state),
        "dense": torch.randn(40, 2100),
    }[source_kind]
    expected = dense_weight(source, torch.bfloat16)
    if layout == "rows":
        buffer = torch.full((100, 2100), 7.0, dtype=torch.bfloat16)
        block = buffer[30:70]
    else:  # 2100 columns: rows of 1050 bytes span two kernel programs, the second partial
        buffer = torch.full((40, 2116), 7.0, dtype=torch.bfloat16)
        block = buffer[:, 10:2110]
    got = dense_weight(source, torch.bfloat16, out=block)
    assert got.data_ptr() == block.data_ptr()
    assert torch.equal(block, expected), _diff(block, expected)
    written = torch.zeros_like(buffer, dtype=torch.bool)
    if layout == "rows":
        written[30:70] = True
    else:
        written[:, 10:2110] = True
    assert bool((buffer[~written] == 7).all()), "values outside out changed"
    with pytest.raises(ValueError, match="unit column stride"):
        dense_weight(lin.weight, torch.bfloat16, out=torch.empty(2100, 40).t())


# The tiled kernels process whole quant blocks, 4096 elements per program by default: shapes
# that are a whole number of tiles take the unmasked path; more than 256 blocks span several
# nested (absmax2) groups; blocksize 4096 is one block per program, 32 the narrowest row.
TILE_CASES = [  # (shape, blocksize, quant_type, dtype)
    ((200, 160), 64, "nf4", torch.bfloat16),  # 500 blocks, 2 groups, last tile partial
    ((64, 256), 64, "fp4", torch.float16),  # 4 whole tiles, exactly one group
    ((96, 512), 32, "nf4", torch.float16),  # 12 whole tiles, 6 groups
    ((3, 4096), 4096, "fp4", torch.bfloat16),  # one block per program, whole tiles
    ((5, 1000), 4096, "nf4", torch.float32),  # a partial 4096-block
    ((1, 1), 64, "fp4", torch.bfloat16),  # one element: half a byte
]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_kernel_tile_edges(device, case, nested):
    shape, blocksize, quant_type, dtype = case
    packed, state = _quantize(shape, dtype, quant_type, nested, blocksize, torch.uint8)
    expected = bnbf.dequantize_4bit(packed, state).to(device)
    state.to(device)
    packed = packed.to(device)
    got32 = dequantize_nf4(packed, state, torch.float32)
    _assert_matches(got32, dequantize_nf4(packed, state, dtype), expected, state)


ROW_CASES = [  # (shape, blocksize, quant_type, dtype): written into buf[:, 3 : 3 + cols]
    ((48, 192), 64, "nf4", torch.bfloat16),  # 3 blocks per row, last tile partial
    ((64, 128), 64, "fp4", torch.float16),  # whole tiles
    ((4, 8192), 4096, "nf4", torch.float32),  # one block per program, 2 per row
    ((37, 75), 64, "fp4", torch.bfloat16),  # odd width: blocks cross rows
    ((5, 40), 64, "nf4", torch.float16),  # rows narrower than a block
]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_row_strided_output(device, case, nested):
    """``out`` as a column block of a wider buffer (odd row stride, odd start column): every
    element lands in its row and the columns around it keep their values."""
    shape, blocksize, quant_type, dtype = case
    packed, state = _quantize(shape, dtype, quant_type, nested, blocksize, torch.uint8, seed=1)
    expected = bnbf.dequantize_4bit(packed, state).to(device)
    state.to(device)
    packed = packed.to(device)
    rows, cols = shape
    outs = {}
    for out_dtype in (torch.float32, dtype):
        buffer = torch.full((rows, cols + 8), 7.0, dtype=out_dtype, device=device)
        block = buffer[:, 3 : 3 + cols]
        assert not block.is_contiguous()
        assert dequantize_nf4(packed, state, out=block).data_ptr() == block.data_ptr()
        border = torch.cat((buffer[:, :3], buffer[:, 3 + cols :]), 1)
        assert bool((border == 7).all()), "values outside out changed"
        outs[out_dtype] = block
    _assert_matches(outs[torch.float32], outs[dtype], expected, state)


@pytest.mark.parametrize("tile,bytes_per_load", [(1024, 4), (32768, 16)])
def test_tile_settings(device, monkeypatch, tile, bytes_per_load):
    """Other tile sizes give the same values; 32768 elements = 512 blocks of 64 per program,
    more than one nested group (256 blocks): the per-block group index path."""
    monkeypatch.setattr(nf4_mod, "_TILE_ELEMENTS", tile)
    monkeypatch.setattr(nf4_mod, "_BYTES_PER_LOAD", bytes_per_load)
    packed, state = _quantize((200, 160), torch.bfloat16, "nf4", True, 64, torch.uint8)
    expected = bnbf.dequantize_4bit(packed, state).to(device)
    state.to(device)
    packed = packed.to(device)
    got = dequantize_nf4(packed, state, torch.float32)
    assert state._turbotune_static.constants["BLOCKS"] == tile // 64
    buffer = torch.zeros(200, 170, dtype=torch.bfloat16, device=device)
    rows = dequantize_nf4(packed, state, out=buffer[:, 5:165])
    _assert_matches(got, rows, expected, state)


def test_non_power_of_two_blocksize_takes_the_reference(device):
    """Our own quantizer accepts any blocksize; the tiled kernels need a power of two, so such
    a weight is dequantized by the eager reference (bitsandbytes never makes one)."""
    from turbotune.distributed.nf4 import NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear(150, 20, blocksize=48, compute_dtype=torch.float32, device=device)
    layer.load_dense(torch.randn(20, 150, device=device))
    state = layer.quant_state()
    expected = dequantize_4bit_reference(state.nibbles, state, torch.float32)
    got = layer.dequantize(torch.float32)
    assert torch.equal(got, expected), _diff(got, expected)
    buffer = torch.zeros(20, 160, device=device)
    layer.dequantize(out=buffer[:, :150])
    assert torch.equal(buffer[:, :150], expected) and bool((buffer[:, 150:] == 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False), ("nf4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_strided_output_cuda(quant_type, nested, dtype):
    """Column blocks of wider buffers at real widths: 4096 columns in a 4112-wide buffer (whole
    blocks per row, aligned, unmasked) and 4100 columns (blocks cross rows, last tile partial)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((4096, 4096), (1000, 4100)):
        w = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, compress_statistics=nested, quant_type=quant_type
        )
        expected = bnbf.dequantize_4bit(packed, state)
        buffer = torch.full((shape[0], shape[1] + 16), 7.0, dtype=dtype, device="cuda")
        got = dequantize_4bit_launch(packed, state, dtype, out=buffer[:, 8 : 8 + shape[1]])
        assert bool((buffer[:, :8] == 7).all()) and bool((buffer[:, 8 + shape[1] :] == 7).all())
        if nested:
            _assert_within_nested_scale_rounding(got, expected, state)
        else:
            assert torch.equal(got, expected), f"{shape}: {_diff(got, expected)}"
