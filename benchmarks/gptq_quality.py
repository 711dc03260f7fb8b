"""GPTQ vs round-to-nearest on a real model: held-out perplexity with the same bits and groups.

Loads SmolLM2-135M-Instruct from its GGUF file in ``../shared/data`` (dequantized to fp32 on
load), cuts Wikipedia text (``llamafactory-demo/wiki_demo.txt``) into tokens, calibrates GPTQ on
random windows of the first 70% and scores on consecutive windows of the last 30% (disjoint),
and writes a small Markdown report. RTN uses the same quantizer and groups, without error
feedback. Run from the repository root::

    python benchmarks/gptq_quality.py --samples 32 --seq-len 512 --eval-windows 24 \\
        --out benchmarks/results/cpu_202611_gptq_quality.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from turbotune.quant.gptq import GPTQSpec
from turbotune.quant.gptq_calibration import perplexity, token_stream, windows
from turbotune.quant.gptq_model import quantize_model, rtn_quantize_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(data: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = data / "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf-tokenizer-config"))
    return model.eval(), tokenizer


def split_stream(tokenizer, data: Path, calib_fraction: float = 0.7):
    text = (data / "llamafactory-demo" / "wiki_demo.txt").read_text(encoding="utf-8")
    stream = token_stream(tokenizer, [line for line in text.splitlines() if line.strip()])
    cut = int(len(stream) * calib_fraction)
    return stream[:cut], stream[cut:]


def batched(items: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(items[i : i + size]) for i in range(0, len(items), size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--asym", action="store_true")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = GPTQSpec(
        bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.desc_act
    )
    model, tokenizer = load(args.data)
    calib, held_out = split_stream(tokenizer, args.data)
    calib_batches = batched(windows(calib, args.samples, args.seq_len, seed=0), 4)
    eval_batches = batched(windows(held_out, args.eval_windows, args.seq_len, seed=None), 4)
    rows = [("fp32 (GGUF dequantized)", perplexity(model, eval_batches), 0.0)]
    rtn = copy.deepcopy(model)
    start = time.perf_counter()
    rtn_quantize_model(rtn, spec)
    seconds = time.perf_counter() - start
    rows.append(("RTN", perplexity(rtn, eval_batches), seconds))
    del rtn
    start = time.perf_counter()
    quantize_model(model, calib_batches, spec, device="cpu")
    seconds = time.perf_counter() - start
    rows.append(("GPTQ", perplexity(model, eval_batches), seconds))
    report = render(args, spec, rows, len(calib), len(held_out))
    print(report)
    if args.out:
        args.out.write_text(report)


def render(args, spec: GPTQSpec, rows, n_calib: int, n_held: int) -> str:
    lines = [
        f"# GPTQ vs RTN: SmolLM2-135M-Instruct, {spec.bits}-bit, group {spec.group_size}",
        "",
        f"{time.strftime('%Y-%m-%d')}, CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} threads), torch {torch.__version__}. sym={spec.sym} "
        f"desc_act={spec.desc_act} damp={spec.percdamp}.",
        "",
        f"Calibration: {args.samples} random {args.seq_len}-token windows of the first 70% of "
        f"`llamafactory-demo/wiki_demo.txt` ({n_calib} tokens). Held out: {args.eval_windows} "
        f"consecutive {args.seq_len}-token windows of the last 30% ({n_held} tokens), disjoint.",
        "",
        "| weights | held-out perplexity | quantization time (s) |",
        "|---|---|---|",
        *(f"| {name} | {ppl:.3f} | {secs:.1f} |" for name, ppl, secs in rows),
        "",
        "Command (repository root):",
        "",
        "```",
        "python benchmarks/gptq_quality.py " + " ".join(_argv(args)),
        "```",
        "",
    ]
    return "\n".join(lines)


def _argv(args) -> list[str]:
    out = [f"--bits {args.bits}", f"--group-size {args.group_size}"]
    out += ["--desc-act"] * args.desc_act + ["--asym"] * args.asym
    out += [f"--samples {args.samples}", f"--seq-len {args.seq_len}"]
    out += [f"--eval-windows {args.eval_windows}", f"--threads {args.threads}"]
    return out


if __name__ == "__main__":
    main()
