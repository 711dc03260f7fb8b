"""Profile one benchmark point: where does a training step's GPU time go?

    python benchmarks/profile_point.py benchmarks/reference-workload.yaml turbotune-qlora-fused 4x1024

Builds the point exactly as ``turbotune bench`` does, runs warm-up steps, then profiles a few
steps with ``torch.profiler`` and prints the kernels by total CUDA time (and writes a Chrome
trace next to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios")
    parser.add_argument("scenario")
    parser.add_argument("shape", help="e.g. 4x1024 or 8x1024+gc")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args(argv)

    from turbotune.bench.models import resolve_model_config
    from turbotune.bench.scenarios import expand, load_scenarios
    from turbotune.bench.worker import _batches, _prepare

    points = [p for p in expand(load_scenarios(args.scenarios)) if p.scenario == args.scenario]
    points = [
        p
        for p in points
        if p.label.split(" ")[1] == args.shape and (args.model is None or p.model == args.model)
    ]
    if not points:
        print(f"no point {args.scenario} {args.shape}", file=sys.stderr)
        return 2
    spec = points[0].spec("/tmp/profile-point")
    device = torch.device("cuda")
    config = resolve_model_config(spec["model"])
    prepared = _prepare(spec, config, device)
    model = prepared.model
    batches = _batches(spec, config.vocab_size, 2 + args.steps, 0, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch) -> None:
        with torch.autocast("cuda", dtype=prepared.autocast, enabled=prepared.autocast is not None):
            loss = model(**batch.inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches[:2]:
        step(batch)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for batch in batches[2:]:
            step(batch)
        torch.cuda.synchronize()
    print(f"== {args.scenario} {args.shape}: {args.steps} steps")
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70
        )
    )
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
