"""FSDP2 on 2 GPUs, the three proofs of issue 10, and the throughput sweep (t).

    NCCL_NVLS_ENABLE=0 python benchmarks/fsdp_gpu.py --only t --out $OUT   # one call, ~5 min
    NCCL_NVLS_ENABLE=0 python benchmarks/fsdp_gpu.py --only a,b --out benchmarks/results
    NCCL_NVLS_ENABLE=0 python benchmarks/fsdp_gpu.py --only c --out benchmarks/results

Runs :mod:`fsdp_point` (each point its own ``torchrun``) and writes
``<gpu>x2_<yyyymm>_fsdp_<points>.json`` and ``.md`` into ``--out``, then prints the summary
table last:

(a) loss parity, 1 vs 2 GPUs, Llama-3.1-8B shape (NF4, LoRA r16 all linears, fused kernels):
    the same global batch (4 x 1024) per step, one GPU unsharded vs two GPUs with FSDP2 and
    2 x 1024 each; losses of every step compared (bf16 compute: a relative gap well under 1%
    is sampling noise of the reduction order; a bug shows up as a gap that grows);
(b) throughput, the reference workload (8B shape, NF4, LoRA r16 all linears, 4 x 1024 per GPU,
    no checkpointing) on 1 GPU unsharded vs 2 GPUs with FSDP2: bar 2-GPU tokens/s >= 1.85x;
(c) a Llama-3.1-70B-shaped model, random weights created directly in 4-bit on each GPU (the
    low-memory path), QLoRA on 2 GPUs each capped at 24 GiB (``set_per_process_memory_fraction``),
    per-block checkpointing with the block inputs offloaded to CPU, 1 x 1024 per GPU, a few
    steps; GPU and host memory peaks reported.

(t) throughput sweep: the reference workload on 1 GPU, then on 2 GPUs under each sharding
    variant of ``--variants`` (default: ``full``, ``full_pf``, ``repl_block``, ``repl_model``,
    ``ddp``; see ``VARIANTS``); every point also reports its host CPU ms per phase, and a
    torch.profiler pass of rank 0 (2 extra steps) gives GPU busy/idle time and NCCL kernel time,
    overlapped with compute or exposed. The table gives tokens/s and the ratio to 1 GPU; the
    kernel summaries of the 1-GPU point and of the fastest 2-GPU variant are written as text.

Points (a-1GPU), (b-1GPU) and (t-1GPU) are the same run (4 x 1024 on one GPU). ``--only``
picks. Per-point logs and records go to a scratch folder (``--work``); ``--out`` receives at
most 8 files: the summary ``.json`` and ``.md``, kernel summaries, logs of failed points.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINT = HERE / "fsdp_point.py"
VARIANTS = {
    "full": [],  # FSDP2 defaults: every block a group, everything sharded (session 2's 1.38x)
    "full_pf": ["--prefetch", "2"],  # + explicit prefetch two blocks ahead
    "full_noreshard": ["--prefetch", "1", "--no-reshard"],  # + no resharding after forward
    "repl_block": ["--frozen", "replicate", "--prefetch", "1"],  # base replicated, LoRA sharded
    "repl_model": ["--frozen", "replicate", "--groups", "model"],  # ... in one FSDP2 group
    "noshard": ["--strategy", "no_shard"],  # FSDP2's data parallelism (replicated groups)
    "ddp": ["--ddp"],  # no FSDP2: DistributedDataParallel over the adapters (the yardstick)
}
DEFAULT_VARIANTS = "full,full_pf,repl_block,repl_model,ddp"


def _run(name: str, nproc: int, extra: list[str], work: Path, timeout: int) -> dict | None:
    out = work / f"{name}.json"
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(POINT)]  # fmt: skip
    else:
        cmd = [sys.executable, str(POINT)]
    cmd += [*extra, "--out", str(out)]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # fmt: skip
    start = time.time()
    log = work / f"{name}.log"
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"   exit {code} after {time.time() - start:.0f}s (log {log})", flush=True)
    if code != 0 or not out.is_file():
        print(log.read_text()[-3000:], flush=True)
        return None
    return json.loads(out.read_text())


def _sweep(res: dict, names: list[str], steps: list[str], work: Path, budget_s: int) -> None:
    """(t): the 2-GPU point of each variant, 4 x 1024 per GPU, with a kernel summary."""
    start = time.time()
    one = res["points"]["8b-1gpu-4x1024"]
    rows = {}
    for name in names:
        if time.time() - start > budget_s:
            print(f"== {name}: skipped (budget of {budget_s}s spent)", flush=True)
            rows[name] = None
            continue
        prof = ["--torch-profile", str(work / f"8b-2gpu-{name}.kernels.txt")]
        point = _run(f"8b-2gpu-{name}", 2, ["--batch", "4", *steps, *VARIANTS[name], *prof],
                     work, 300)  # fmt: skip
        res["points"][f"8b-2gpu-4x1024-{name}"] = point
        rows[name] = point
    done = {k: v for k, v in rows.items() if v}
    best = max(done, key=lambda k: done[k]["tokens_per_s"]) if done else None
    res["sweep"] = {
        "variants": {k: VARIANTS[k] for k in names},
        "ratio": {k: (v["tokens_per_s"] / one["tokens_per_s"] if v and one else None)
                  for k, v in rows.items()},
        "best": best,
    }  # fmt: skip


def _keep_files(res: dict, work: Path, out: Path) -> None:
    """Copy into ``out`` the kernel summaries of the 1-GPU point and of the best variant, and
    the logs of failed points (at most 3): with the summary .json/.md, 8 files at most."""
    names = ["8b-1gpu.kernels.txt"]
    if res.get("sweep", {}).get("best"):
        names.append(f"8b-2gpu-{res['sweep']['best']}.kernels.txt")
    failed = [k for k, v in res["points"].items() if v is None]
    res["failed_logs"] = {}
    for path in sorted(work.glob("*.log")):
        record = work / (path.stem + ".json")
        if not record.is_file():
            res["failed_logs"][path.name] = path.read_text()[-4000:]
            if len(names) < 6:
                names.append(path.name)
    for name in names:
        if (work / name).is_file():
            shutil.copy(work / name, out / name)
    res["failed"] = failed


def _parity(one: dict | None, two: dict | None) -> dict:
    if not one or not two:
        return {"ok": False, "why": "a run failed"}
    a, b = one["losses"], two["losses"]
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    return {"ok": max(rel) < 1e-2, "max_rel_diff": max(rel), "first_rel_diff": rel[0],
            "losses_1gpu": a, "losses_2gpu": b}  # fmt: skip


def _table(res: dict) -> str:
    rows = ["| point | GPUs | tokens/s | tokens/s/GPU | step s | GPU peak GiB | host peak GiB | note |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in res["points"].items():
        if r is None:
            rows.append(f"| {name} | - | failed | | | | | |")
            continue
        rows.append(
            f"| {name} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} "
            f"| {r['step_s']:.3f} | {r['gpu_peak_gib']:.1f} | {r['host_peak_gib']:.1f} "
            f"| load {r['load_s']:.0f}s, load GPU peak {r['load_gpu_peak_gib']:.1f} GiB"
            f"{', CPU offload' if r['cpu_offload'] else ''} |"
        )
    p, s = res.get("parity"), res.get("speedup")
    if p:
        rows.append(f"\n(a) loss parity 1 vs 2 GPUs: max relative diff {p.get('max_rel_diff', float('nan')):.2e} "
                    f"(step 1: {p.get('first_rel_diff', float('nan')):.2e}) -> {'PASS' if p['ok'] else 'FAIL'} (< 1e-2)")  # fmt: skip
    if s:
        rows.append(
            f"(b) 2-GPU / 1-GPU tokens/s: {s['ratio']:.3f}x -> {'PASS' if s['ok'] else 'FAIL'} (>= 1.85x)"
        )
    if "sweep" in res:
        rows.append("\n" + _sweep_table(res))
    c = res["points"].get("c-70b-2gpu-24gib")
    if "c" in res["only"]:
        ok = c is not None and c["gpu_peak_gib"] <= 24.0
        rows.append(f"(c) 70B QLoRA on 2 GPUs capped at 24 GiB: {'PASS' if ok else 'FAIL'}"
                    + (f", losses {[round(x, 3) for x in c['losses']]}" if c else ""))  # fmt: skip
    return "\n".join(rows)


def _sweep_table(res: dict) -> str:
    """(t): one row per point; host ms = rank 0's CPU ms per phase (min over steps); GPU
    columns from the torch.profiler pass of rank 0 (ms per step)."""
    rows = ["| (t) point | tokens/s | x 1 GPU | step ms | host ms fwd/bwd/opt | GPU busy ms "
            "| NCCL ms (exposed) | GPU idle ms | GPU peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    one = res["points"].get("8b-1gpu-4x1024")
    points = [("1 GPU", one)] + [(k, res["points"].get(f"8b-2gpu-4x1024-{k}"))
                                 for k in res["sweep"]["variants"]]  # fmt: skip
    for name, r in points:
        if r is None:
            rows.append(f"| {name} | failed or skipped | | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        h, g = r.get("host_ms", {}), r.get("gpu_profile", {})
        host = "/".join(
            f"{h.get(k, float('nan')):.0f}" for k in ("forward", "backward", "optimizer")
        )
        rows.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {ratio:.3f} | {r['step_s'] * 1e3:.0f} | {host} "
            f"| {g.get('gpu_busy_ms', float('nan')):.0f} | {g.get('nccl_ms', float('nan')):.1f} "
            f"({g.get('nccl_exposed_ms', float('nan')):.1f}) | {g.get('gpu_idle_ms', float('nan')):.0f} "
            f"| {r['gpu_peak_gib']:.1f} |"
        )
    best = res["sweep"]["best"]
    if best:
        ratio = res["sweep"]["ratio"][best]
        rows.append(f"\n(t) fastest 2-GPU variant: {best} {VARIANTS[best]}: {ratio:.3f}x -> "
                    f"{'PASS' if ratio >= 1.85 else 'FAIL'} (>= 1.85x)")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description="FSDP2 proofs on 2 GPUs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", default="a,b,c")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of this script)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"(t): of {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=int, default=330,
                   help="(t): skip the variants left once this many seconds have passed")  # fmt: skip
    p.add_argument("--parity-variant", default="full", choices=list(VARIANTS),
                   help="(a): the sharding variant of the 2-GPU parity point")  # fmt: skip
    p.add_argument("--work", default=None, help="per-point logs and records (default: a temp dir)")
    args = p.parse_args()
    only = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="fsdp_runs_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = ["--steps", str(args.steps), "--warmup", "3"]
    big = ["--model", "llama-3.1-70b"]
    if args.smoke:
        tiny = "@layers=2,hidden_size=128,intermediate_size=256,num_attention_heads=4,"
        tiny += "num_key_value_heads=2,vocab_size=512"
        steps += ["--model", "llama-3.1-8b" + tiny, "--seq", "32"]
        big = ["--model", "llama-3.1-70b" + tiny]
    res: dict = {"only": sorted(only), "points": {}}
    if only & {"a", "b", "t"}:
        prof = ["--torch-profile", str(work / "8b-1gpu.kernels.txt")] if "t" in only else []
        res["points"]["8b-1gpu-4x1024"] = _run(
            "8b-1gpu", 1, ["--no-fsdp", "--batch", "4", *steps, *prof], work, 600
        )
    if "t" in only:
        _sweep(res, args.variants.split(","), steps, work, args.budget_s)
    if "a" in only:
        res["points"]["8b-2gpu-2x1024-parity"] = _run(
            "8b-2gpu-parity",
            2,
            ["--global-batch", "4", *steps, *VARIANTS[args.parity_variant]],
            work,
            600,
        )
        res["parity"] = _parity(
            res["points"]["8b-1gpu-4x1024"], res["points"]["8b-2gpu-2x1024-parity"]
        )
    if "b" in only:
        two = _run("8b-2gpu", 2, ["--batch", "4", *steps], work, 600)
        res["points"]["8b-2gpu-4x1024"] = two
        one = res["points"]["8b-1gpu-4x1024"]
        ratio = two["tokens_per_s"] / one["tokens_per_s"] if one and two else float("nan")
        res["speedup"] = {"ratio": ratio, "ok": ratio >= 1.85}
    if "c" in only:
        c_args = [*big, "--batch", "1", "--seq", "32" if args.smoke else "1024", "--steps", "3",
                  "--warmup", "1", "--checkpointing", "--offload-activations",
                  "--memory-cap-gib", "24"]  # fmt: skip
        point = _run("70b-2gpu", 2, c_args, work, 420)
        if point is None:  # out of memory under the cap: parameters and optimizer on the CPU
            point = _run("70b-2gpu-cpu-offload", 2, [*c_args, "--cpu-offload"], work, 600)
        res["points"]["c-70b-2gpu-24gib"] = point
    _keep_files(res, work, out)
    gpu = next((r["gpu"] for r in res["points"].values() if r), "gpu").split()[-1].lower()
    stem = out / f"{gpu}x2_{time.strftime('%Y%m')}_fsdp_{''.join(sorted(only))}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    table = _table(res)
    stem.with_suffix(".md").write_text(
        f"# FSDP2 on 2 GPUs ({time.strftime('%Y-%m-%d')})\n\nCommand: `python benchmarks/fsdp_gpu.py "
        f"--only {args.only}`\n\n{table}\n"
    )
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
