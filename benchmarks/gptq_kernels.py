"""GPTQ kernel microbenchmark: dequantization bandwidth, and forward / input-gradient matmul
time vs bf16 dense and NF4 at the Llama-3-8B projection shapes (one GPU, CUDA events, median).

    python benchmarks/gptq_kernels.py [--bits 4 8] [--tokens 1 16 64 256 4096] [--csv out.csv]

Columns: ``dequant`` = our Triton GPTQ dequantizer (GB/s counts the packed bytes read plus the
dense bytes written); ``fused`` / ``buffered`` = the two strategies of ``ops.gptq`` forced (the
dispatcher picks fused for ``tokens <= FUSED_MAX_ROWS``): their crossover is what
``FUSED_MAX_ROWS`` should be; ``dense`` = ``F.linear`` on a bf16 weight; ``nf4`` = bitsandbytes
NF4 storage dequantized by ``ops.nf4`` then ``F.linear`` (skipped when bitsandbytes is absent).
Times in microseconds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# (name, out_features, in_features) of one Llama-3-8B decoder block
SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]


def _time_us(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn`` in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _gptq_storage(out_f: int, in_f: int, bits: int, group: int, act_order: bool):
    from turbotune.quant.gptq_format import default_g_idx, pack_gptq

    q = torch.randint(0, 1 << bits, (out_f, in_f), device="cuda")
    z = torch.randint(1, 1 << bits, (in_f // group, out_f), device="cuda")
    s = torch.rand(in_f // group, out_f, device="cuda") * 1e-2
    g = default_g_idx(in_f, group, "cuda")
    if act_order:
        g = g[torch.randperm(in_f, device="cuda")]
    return tuple(pack_gptq(q, z, s, g, bits))


def _nf4(weight: torch.Tensor):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Params4bit(weight.cpu(), quant_type="nf4", compress_statistics=True).cuda()


def _cases(x, dy, storage, bits, dense, nf4) -> dict[str, Callable[[], object]]:
    """The timed calls for one token count (inputs ``x [M, in]`` and ``dy [M, out]``)."""
    from turbotune.ops import gptq
    from turbotune.ops.nf4 import dequantize_nf4

    dtype = x.dtype
    cases = {
        "fwd_fused": lambda: gptq._fused_launch(x, storage, bits, transpose=False),
        "fwd_buffered": lambda: F.linear(x, gptq.gptq_dequantize(storage, bits, dtype)),
        "fwd_dense": lambda: F.linear(x, dense),
        "dx_fused": lambda: gptq._fused_launch(dy, storage, bits, transpose=True),
        "dx_buffered": lambda: dy @ gptq.gptq_dequantize(storage, bits, dtype),
        "dx_dense": lambda: dy @ dense,
    }
    if nf4 is not None:
        cases["fwd_nf4"] = lambda: F.linear(x, dequantize_nf4(nf4, dtype=dtype))
        cases["dx_nf4"] = lambda: dy @ dequantize_nf4(nf4, dtype=dtype)
    return cases


def _error(err: BaseException) -> str:
    """A table cell for a variant that failed: the exception's type and first line."""
    lines = str(err).strip().splitlines()
    return f"error: {type(err).__name__}: {lines[0][:160] if lines else ''}"


def _timed(fn: Callable[[], object], reps: int) -> float | str:
    """``_time_us(fn)``, or an error cell: one failing variant must not end the table."""
    try:
        return _time_us(fn, reps)
    except Exception as err:  # reported in the row; the next variant still runs
        print(f"# {_error(err)}", file=sys.stderr, flush=True)
        return _error(err)


def _rows(name, out_f, in_f, bits, tokens_list, dtype, reps, act_order) -> Iterator[dict]:
    """One row per token count for one projection shape (storage built once); a shape whose
    setup fails gives one error row."""
    from turbotune.ops import gptq
    from turbotune.ops.nf4 import dequantize_nf4

    head = {"shape": f"{name} {out_f}x{in_f}", "bits": bits}
    try:
        storage = _gptq_storage(out_f, in_f, bits, 128, act_order)
        dense = gptq.gptq_dequantize(storage, bits, dtype)
    except Exception as err:  # e.g. out of memory: report and go on to the next shape
        yield {**head, "error": _error(err)}
        return
    try:
        nf4 = _nf4(dense)
    except Exception as err:  # NF4 is a comparison column only
        print(f"# nf4 skipped for {head['shape']}: {_error(err)}", file=sys.stderr, flush=True)
        nf4 = None
    packed_bytes = sum(t.numel() * t.element_size() for t in storage)
    t_deq = _timed(lambda: gptq.gptq_dequantize(storage, bits, dtype), reps)
    dense_bytes = dense.numel() * dense.element_size()
    gbps = (packed_bytes + dense_bytes) / t_deq / 1e3 if isinstance(t_deq, float) else t_deq
    common = {**head, "dequant_us": t_deq, "dequant_GBps": gbps}
    if nf4 is not None:
        common["nf4_dequant_us"] = _timed(lambda: dequantize_nf4(nf4, dtype=dtype), reps)
    for tokens in tokens_list:
        row = {**common, "tokens": tokens}
        try:
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
            dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
        except Exception as err:
            yield {**row, "error": _error(err)}
            continue
        cases = _cases(x, dy, storage, bits, dense, nf4)
        row.update({f"{key}_us": _timed(fn, reps) for key, fn in cases.items()})
        del x, dy
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--act-order", action="store_true", help="non-monotonic g_idx")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--csv", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"# GPTQ kernels on {torch.cuda.get_device_name()}, {args.dtype}, "
          f"act_order={args.act_order}, median of {args.reps}, times in us")  # fmt: skip
    try:
        for bits in args.bits:
            for name, out_f, in_f in SHAPES:
                for row in _rows(
                    name, out_f, in_f, bits, args.tokens, dtype, args.reps, args.act_order
                ):
                    rows.append(row)
                    print(" | ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items()), flush=True)  # fmt: skip
    finally:  # the rows measured so far are kept, whatever stopped the run
        if args.csv and rows:
            _write_csv(args.csv, rows)
    failed = sum(isinstance(v, str) and v.startswith("error") for r in rows for v in r.values())
    if failed:
        print(f"# {failed} variant(s) failed: see the error cells", file=sys.stderr)
    return 1 if failed else 0


def _write_csv(path: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
