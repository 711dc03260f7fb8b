"""FSDP2 on 2 GPUs, the three proofs of issue 10 (two device calls of ~5 min each).

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

Points (a-1GPU) and (b-1GPU) are the same run (4 x 1024 on one GPU). ``--only a,b,c`` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINT = HERE / "fsdp_point.py"


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
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    print(f"   exit {proc.returncode} after {time.time() - start:.0f}s (log {log})", flush=True)
    if proc.returncode != 0 or not out.is_file():
        print(log.read_text()[-3000:], flush=True)
        return None
    return json.loads(out.read_text())


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
    c = res["points"].get("c-70b-2gpu-24gib")
    if "c" in res["only"]:
        ok = c is not None and c["gpu_peak_gib"] <= 24.0
        rows.append(f"(c) 70B QLoRA on 2 GPUs capped at 24 GiB: {'PASS' if ok else 'FAIL'}"
                    + (f", losses {[round(x, 3) for x in c['losses']]}" if c else ""))  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description="FSDP2 proofs on 2 GPUs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", default="a,b,c")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of this script)")
    args = p.parse_args()
    only = set(args.only.split(","))
    out = Path(args.out)
    work = out / "fsdp_runs"
    work.mkdir(parents=True, exist_ok=True)
    steps = ["--steps", str(args.steps), "--warmup", "3"]
    big = ["--model", "llama-3.1-70b"]
    if args.smoke:
        tiny = "@layers=2,hidden_size=128,intermediate_size=256,num_attention_heads=4,"
        tiny += "num_key_value_heads=2,vocab_size=512"
        steps += ["--model", "llama-3.1-8b" + tiny, "--seq", "32"]
        big = ["--model", "llama-3.1-70b" + tiny]
    res: dict = {"only": sorted(only), "points": {}}
    if only & {"a", "b"}:
        res["points"]["8b-1gpu-4x1024"] = _run(
            "8b-1gpu", 1, ["--no-fsdp", "--batch", "4", *steps], work, 600
        )
    if "a" in only:
        res["points"]["8b-2gpu-2x1024-parity"] = _run(
            "8b-2gpu-parity", 2, ["--global-batch", "4", *steps], work, 600
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
