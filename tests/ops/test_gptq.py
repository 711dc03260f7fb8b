"""GPTQ kernels (ops/gptq.py) and GPTQLinear vs the eager reference (ops/reference.py)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_compiles, compile_script

from turbotune.ops import gptq
from turbotune.ops._triton import interpreting
from turbotune.ops.reference import dequantize_gptq_reference, gptq_linear_reference
from turbotune.quant.gptq_format import GPTQ_BITS, default_g_idx, n_groups, pack_gptq
from turbotune.quant.gptq_linear import GPTQLinear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _storage(out_f, in_f, bits, group_size=32, act_order=False, seed=0, device="cpu"):
    """Random GPTQ storage; scales ~ 1/sqrt(in) / 2**bits so W has unit-ish row norms."""
    gen = torch.Generator().manual_seed(seed)
    groups = n_groups(in_f, group_size)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    z = torch.randint(0, 1 << bits, (groups, out_f), generator=gen)
    s = (torch.rand(groups, out_f, generator=gen) + 0.5) * (4.0 / (1 << bits)) / in_f**0.5
    g = default_g_idx(in_f, group_size)
    if act_order:
        perm = torch.randperm(in_f, generator=gen)
        g = torch.empty_like(g)
        g[perm] = default_g_idx(in_f, group_size)
    return tuple(t.to(device) for t in pack_gptq(q, z, s, g, bits))


def _assert_dequant_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, except 1 bf16 ulp under the interpreter (it truncates fp32 -> bf16 where
    the GPU rounds to nearest even)."""
    diff = (got.float() - want.float()).abs()
    msg = f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}, {int((diff > 0).sum())} differ"
    if got.dtype == torch.bfloat16 and interpreting():
        ulp = want.float().abs() * 2.0**-7 + 1e-30
        assert bool((diff <= ulp).all()), msg
    else:
        assert torch.equal(got, want), msg


# tiny, and one larger than the 64 x 64 block in both dims and not a multiple of it
SHAPES = [(16, 32), (80, 160)]


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_dequantize_kernel_matches_reference(device, bits, out_f, in_f):
    if bits == 3:
        out_f, in_f = -(-out_f // 32) * 32, -(-in_f // 32) * 32  # 3 bits: multiples of 32
    storage = _storage(out_f, in_f, bits, group_size=32, act_order=in_f > 32, seed=bits,
                       device=device)  # fmt: skip
    for dtype in DTYPES:
        want = dequantize_gptq_reference(*storage, bits, dtype)
        _assert_dequant_equal(gptq.gptq_dequantize(storage, bits, dtype), want)


@pytest.mark.parametrize("group_size", [-1, 48, 128])
def test_dequantize_group_sizes_and_out_blocks(device, group_size):
    """Uneven last group, one group; writing into row and column blocks of wider buffers."""
    out_f, in_f, bits = 40, 160, 4
    storage = _storage(out_f, in_f, bits, group_size, act_order=True, seed=7, device=device)
    want = dequantize_gptq_reference(*storage, bits, torch.bfloat16)
    buf = torch.full((out_f + 8, in_f + 24), 7.0, dtype=torch.bfloat16, device=device)
    got = gptq.gptq_dequantize(storage, bits, torch.float32, out=buf[4 : 4 + out_f, :in_f])
    assert got.data_ptr() == buf[4:, :].data_ptr() and got.dtype == torch.bfloat16
    _assert_dequant_equal(buf[4 : 4 + out_f, :in_f], want)
    untouched = torch.cat([buf[:4].flatten(), buf[4 + out_f :].flatten(), buf[:, in_f:].flatten()])
    assert bool((untouched == 7.0).all()), "wrote outside the out block"
    with pytest.raises(ValueError, match="out must be"):
        gptq.gptq_dequantize(storage, bits, torch.bfloat16, out=buf[:out_f, : in_f + 1])


@pytest.mark.parametrize(
    "bits,rows", [(4, 1), (4, 13), (4, gptq.FUSED_MAX_ROWS + 7), (3, 13), (8, 13)]
)
def test_forward_and_input_grad_kernels(device, bits, rows):
    """``x W^T`` and ``dy W`` (fused for few rows, dequantize + matmul above FUSED_MAX_ROWS)
    vs fp32 matmuls of the same dequantized W: the only error is the final rounding and the
    bf16 rounding of W (the eager bf16 run pays the same)."""
    out_f, in_f = 64, 96
    storage = _storage(out_f, in_f, bits, act_order=True, seed=bits, device=device)
    gen = torch.Generator().manual_seed(rows)
    x, dy = torch.randn(rows, in_f, generator=gen), torch.randn(rows, out_f, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        w = dequantize_gptq_reference(*storage, bits, dtype).float()
        xd, dyd = x.to(device, dtype), dy.to(device, dtype)
        for got, want, eager in (
            (gptq.gptq_forward(xd, storage, bits), xd.float() @ w.t(), xd @ w.to(dtype).t()),
            (gptq.gptq_input_grad(dyd, storage, bits), dyd.float() @ w, dyd @ w.to(dtype)),
        ):
            err, eager_err = (got.float() - want).abs(), (eager.float() - want).abs().max()
            bound = 2 * eager_err + 2 * torch.finfo(dtype).eps * want.abs().max()
            assert got.dtype == dtype and got.shape == want.shape
            assert err.max() <= bound, f"{dtype}: max {err.max():.3e} mean {err.mean():.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_reduction(device, dtype):
    """The reduction split over programs (atomic fp32 partial sums) gives the unsplit result
    up to summation order: both directions, 3-way split, act-order."""
    storage = _storage(128, 192, 4, act_order=True, seed=11, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 192, generator=gen).to(device, dtype)
    dy = torch.randn(5, 128, generator=gen).to(device, dtype)
    w = dequantize_gptq_reference(*storage, 4, dtype).float()
    for a, transpose, want in ((x, False, x.float() @ w.t()), (dy, True, dy.float() @ w)):
        split = gptq._fused_launch(a, storage, 4, transpose, split=3)
        single = gptq._fused_launch(a, storage, 4, transpose, split=1)
        for got in (split, single):
            err = (got.float() - want).abs()
            bound = 2 * torch.finfo(dtype).eps * want.abs().max()
            assert got.dtype == dtype and err.max() <= bound, f"max {err.max():.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,rows,bias", [(4, 13, True), (8, 70, False)])
def test_gptq_linear_forward_and_input_grad(parity, device, dtype, bits, rows, bias):
    """GPTQLinear vs ``x W^T + b`` on the dequantized fp32 weight: output and dx (and db)."""
    out_f, in_f = 72, 96
    layer = GPTQLinear.from_tensors(*_storage(out_f, in_f, bits, act_order=True, seed=3), bits)
    layer = layer.to(device)
    master = {"x": torch.randn(2, rows, in_f).requires_grad_()}
    if bias:
        master["b"] = torch.randn(out_f).requires_grad_()

    def ours(x, b=None):
        if b is None:
            return layer(x)
        return gptq.gptq_linear(x, layer.storage(), bits, b)  # a trainable bias: db is checked

    def ref(x, b=None):
        return gptq_linear_reference(x, layer.storage(), bits, b)

    parity(ours, ref, master, dtype, device)


def test_gptq_linear_module_forward_saves_no_dense_weight(device):
    """The module's forward equals the functional entry and the graph holds only the storage."""
    layer = GPTQLinear.from_tensors(*_storage(64, 96, 4, seed=5), 4, bias=torch.randn(64))
    layer = layer.to(device)
    x = torch.randn(3, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert {t.dtype for t in saved} <= {torch.int32, torch.float16}, [t.dtype for t in saved]
    assert sum(t.numel() for t in saved if t.dtype != torch.int32) < 64 * 96 // 8
    ref = gptq_linear_reference(x.detach(), layer.storage(), 4, layer.bias)
    assert torch.allclose(y.float(), ref.float(), atol=0.05, rtol=0.02)
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is None  # frozen bias


def test_autocast_runs_in_autocast_dtype():
    layer = GPTQLinear.from_tensors(*_storage(32, 64, 4, seed=2), 4)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_llama8b_mlp_shape_gpu(bits, act_order):
    """Llama-3-8B gate/up (14336 x 4096) and down (4096 x 14336), group 128: bit-exact."""
    for out_f, in_f in ((14336, 4096), (4096, 14336)):
        storage = _storage(out_f, in_f, bits, 128, act_order, seed=1, device="cuda")
        for dtype in (torch.bfloat16, torch.float16):
            want = dequantize_gptq_reference(*storage, bits, dtype)
            _assert_dequant_equal(gptq.gptq_dequantize(storage, bits, dtype), want)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 4096])
def test_gptq_linear_llama8b_shape_gpu(parity, rows):
    """Forward and input gradient at 4096 -> 14336, fused (16 rows) and buffered (4096 rows)."""
    storage = _storage(14336, 4096, 4, 128, act_order=True, seed=4, device="cuda")
    master = {"x": torch.randn(rows, 4096).requires_grad_()}
    for dtype in (torch.bfloat16, torch.float16):
        parity(
            lambda x: gptq.gptq_linear(x, storage, 4),
            lambda x: gptq_linear_reference(x, storage, 4),
            master, dtype, torch.device("cuda"),
        )  # fmt: skip


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turbotune.ops import gptq

q = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32"}
def build(kernel, pointers, constexprs):
    fn = getattr(gptq, kernel)
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))
for bits in (3, 4):  # 3 bits: the word-crossing path
    build("_dequant_kernel", {**q, "out_ptr": "*bf16"}, {"BITS": bits, "BLOCK_K": 64, "BLOCK_N": 64})
    for t in (False, True):
        for split in (False, True):  # split: atomic adds into an fp32 output
            c = {"TRANSPOSE": t, "BITS": bits, "DOT_FP32": False, "SPLIT": split, "BLOCK_M": 16,
                 "BLOCK_N": 64 if t else 32, "BLOCK_K": 32 if t else 64}
            out = "*fp32" if split else "*bf16"
            build("_matmul_kernel", {**q, "a_ptr": "*bf16", "c_ptr": out}, c)
print("ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile for an H100 ahead of time."""
    assert_compiles(COMPILE_SCRIPT)


# ---- fused kernel configs: shared memory (the H100 benchmark once asked for 1 MB at 4096 rows) ----

H100_SHARED, A100_SHARED = 232448, 166912  # max shared memory per block, bytes
# (arch, max shared, SMs) of the GPUs the selection must fit
ARCHS = {"sm_90": (90, H100_SHARED, 132), "sm_80": (80, A100_SHARED, 108)}
# benchmarks/gptq_kernels.py: Llama-3-8B (out, in); rows: every fused count and its --tokens
BENCH_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
BENCH_ROWS = [*range(1, 65), 256, 4096]


def _compile_jobs(arch: str, shapes, rows_list, bits_list) -> list[dict]:
    """The distinct ``_matmul_kernel`` compilations the launcher makes for these shapes: the
    config :func:`gptq.fused_config` picks for the arch's shared memory and the split the plan
    takes for its SM count. Act-order and the group size are data (``g_idx``, scale rows), not
    compile parameters. Ints are specialized as Triton does at launch (``% 16 == 0``); ``M``
    is left plain (it takes every value)."""
    _, max_shared, sms = ARCHS[arch]
    jobs = {}
    for out_f, in_f in shapes:
        for rows in rows_list:
            for bits in bits_list:
                for t in (False, True):
                    config = gptq.fused_config(rows, t, max_shared)
                    cols, loop = (in_f, out_f) if t else (out_f, in_f)
                    plan = gptq.fused_plan(rows, cols, loop, config, t, sms)
                    ints = {"N": out_f, "K": in_f, "split_len": plan.split_len,
                            "stride_am": loop, "stride_cm": cols, "stride_qw": out_f,
                            "stride_qz": out_f * bits // 32, "stride_s": out_f}  # fmt: skip
                    job = {"arch": arch, "config": config._asdict(), "transpose": t, "bits": bits,
                           "split": plan.grid[2] > 1,
                           "aligned": sorted(k for k, v in ints.items() if v % 16 == 0)}  # fmt: skip
                    jobs[repr(job)] = job
    return list(jobs.values())


SHARED_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turbotune.ops import gptq

fn = gptq._matmul_kernel
out = []
for job in json.load(sys.stdin):
    c = job["config"]
    constexprs = {"TRANSPOSE": job["transpose"], "BITS": job["bits"], "DOT_FP32": False,
                  "SPLIT": job["split"], "BLOCK_M": c["block_m"], "BLOCK_N": c["block_n"],
                  "BLOCK_K": c["block_k"]}
    ptrs = {"a_ptr": "*bf16", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
            "g_idx_ptr": "*i32", "c_ptr": "*fp32" if job["split"] else "*bf16"}
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32") for n in fn.arg_names}
    aligned = set(ptrs) | set(job["aligned"])  # torch allocations are 16-byte aligned
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
    arch = int(job["arch"][3:])
    options = {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    out.append(kernel.metadata.shared)
print(json.dumps(out))
"""


def _compiled_shared(jobs: list[dict]) -> list[int]:
    """``metadata.shared`` of each job compiled ahead of time (no GPU needed), in a subprocess
    without TRITON_INTERPRET (this process decorated the kernels for the interpreter)."""
    import json

    done = compile_script(SHARED_SCRIPT, stdin=json.dumps(jobs), timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_shared_fits(jobs: list[dict]) -> None:
    """Each compiled config fits its GPU and stays under ``shared_bytes_bound`` (the bound the
    selection trusts on GPUs and Triton versions not compiled here)."""
    bad = []
    for job, shared in zip(jobs, _compiled_shared(jobs), strict=True):
        config = gptq.FusedConfig(**job["config"])
        bound = gptq.shared_bytes_bound(config, job["transpose"])
        limit = ARCHS[job["arch"]][1]
        if not shared <= min(bound, limit):
            bad.append(f"{job}: shared {shared} B, bound {bound}, limit {limit}")
    assert not bad, "\n".join(bad)


def test_fused_config_fits_shared_memory_fast():
    """sm_90 compile of the config that failed on the H100 (dy W, down 4096 x 14336, 4096 rows:
    1 MB of shared memory) and of the largest dispatcher one (64 rows)."""
    jobs = _compile_jobs("sm_90", [(4096, 14336)], [64, 4096], [4])
    assert {j["config"]["block_m"] for j in jobs} == {64, 128}
    _assert_shared_fits([j for j in jobs if j["transpose"]])


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_configs_fit_shared_memory_benchmark_shapes(arch):
    """Every fused compilation of benchmarks/gptq_kernels.py (Llama-3-8B shapes, rows 1..64,
    256, 4096, bits 4 and 8, both directions, split or not) fits the H100 / A100."""
    _assert_shared_fits(_compile_jobs(arch, BENCH_SHAPES, BENCH_ROWS, [4, 8]))


@pytest.mark.parametrize("transpose", [False, True])
def test_fused_config_selection(transpose):
    """Row blocks stop at 128 (more rows: more blocks); the bound fits the limit; a smaller
    limit shrinks stages, then rows."""
    for rows in (1, 17, 64, 65, 4096, 100_000):
        for limit in (A100_SHARED, H100_SHARED):
            config = gptq.fused_config(rows, transpose, limit)
            assert config.block_m == min(128, max(16, 1 << (rows - 1).bit_length())), config
            assert gptq.shared_bytes_bound(config, transpose) <= limit
        small = gptq.fused_config(rows, transpose, 60_000)
        assert gptq.shared_bytes_bound(small, transpose) <= 60_000
        assert (small.block_m, small.num_stages) < (config.block_m, config.num_stages)


class _ShrinkingGPU:
    """``_matmul_kernel`` behind a GPU that has less shared memory than any bound promises:
    launches above ``max_block_m`` rows or ``max_stages`` stages raise Triton's own
    ``OutOfResources`` (as ``_init_handles`` does on a GPU; the interpreter never would)."""

    def __init__(self, kernel, max_block_m: int, max_stages: int) -> None:
        self.kernel, self.max_block_m, self.max_stages = kernel, max_block_m, max_stages
        self.tried: list[tuple[int, int]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tried.append((kwargs["BLOCK_M"], kwargs["num_stages"]))
            if kwargs["BLOCK_M"] > self.max_block_m or kwargs["num_stages"] > self.max_stages:
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(1073664, 232448, "shared memory")
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("fits", [True, False])
def test_fused_launch_retries_smaller_configs(device, monkeypatch, fits):
    """OutOfResources at launch: smaller configs until one runs, remembered for the next call
    (one launch); none runs: dequantize + matmul with a warning. Results equal the reference."""
    pytest.importorskip("triton")
    storage = _storage(64, 96, 4, act_order=True, seed=9, device=device)
    gpu = _ShrinkingGPU(gptq._matmul_kernel, 16 if fits else 0, 1)
    monkeypatch.setattr(gptq, "_matmul_kernel", gpu)
    monkeypatch.setattr(gptq, "_CONFIGS", {})
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    w = dequantize_gptq_reference(*storage, 4, torch.bfloat16).float()
    want = x.float() @ w.t()
    for call in range(2):
        gpu.tried.clear()
        if fits:
            got = gptq._fused_launch(x, storage, 4, transpose=False)
        else:
            with pytest.warns(RuntimeWarning, match="dequantize"):
                got = gptq._fused_launch(x, storage, 4, transpose=False)
        err = (got.float() - want).abs()
        assert err.max() <= 2 * 2.0**-8 * want.abs().max(), f"max {err.max():.3e}"
        if fits:  # 64 rows x 3, 2, 1 stages, 32 x 3, 2, 1, 16 x 3, 2, 1: the last one runs
            assert gpu.tried == ([(64, 3), (64, 2), (64, 1), (32, 3), (32, 2), (32, 1), (16, 3),
                                  (16, 2), (16, 1)] if call == 0 else [(16, 1)])  # fmt: skip
        else:
            assert len(gpu.tried) == 9 and not gptq._CONFIGS


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 256, 4096])
def test_fused_kernel_many_rows_gpu(rows):
    """The fused kernel at the rows the benchmark forces (4096 asked 1 MB of shared memory on
    the H100): runs on this GPU, both directions, vs fp32 matmuls of the dequantized W."""
    storage = _storage(4096, 14336, 4, 128, act_order=True, seed=6, device="cuda")
    assert gptq.shared_bytes_bound(gptq.fused_config(rows, True), True) <= (
        gptq.max_shared_memory(torch.device("cuda"))
    )
    w = dequantize_gptq_reference(*storage, 4, torch.bfloat16).float()
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 14336, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(rows, 4096, device="cuda", generator=gen).bfloat16()
    for a, transpose, want in ((x, False, x.float() @ w.t()), (dy, True, dy.float() @ w)):
        got = gptq._fused_launch(a, storage, 4, transpose)
        err = (got.float() - want).abs()
        bound = 4 * 2.0**-8 * want.abs().max()  # bf16 output rounding, fp32 accumulation
        assert err.max() <= bound, (
            f"transpose={transpose}: max {err.max():.3e} mean {err.mean():.3e}"
        )
