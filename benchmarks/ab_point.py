"""A/B of runtime switches on one benchmark point, in one process, alternating variants.

    python benchmarks/ab_point.py benchmarks/reference-workload.yaml turbotune-qlora-fused 4x1024

Builds the point once (as ``turbotune bench`` does), then times each variant of the switches
below in turn, ``--rounds`` times, so that drift of the GPU (clocks, temperature) spreads over
all variants alike. Each variant is the flags' defaults plus its own settings (``defaults``:
none), so ``--variants defaults,no-fold,no-spare`` measures each switch against the same base.
Prints the median step time and tokens/s of each variant, and its ratio to the first. Switches: the CUDA graphs of the decoder layers (``ops/graphs.py``) and the
module flags of ``_FLAGS`` (folded adapters, spare columns, fused add-norm, flat gradient
copies); add a flag to ``_FLAGS`` and its on/off pair to ``VARIANTS`` to A/B it. Also prints the peak memory of the whole run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

VARIANTS = {
    "graphs": {"graphs": True},
    "eager": {"graphs": False},
    "fold": {"fold": True},
    "no-fold": {"fold": False},
    "spare": {"spare": True},
    "no-spare": {"spare": False},
    "add-norm": {"add_norm": True},
    "no-add-norm": {"add_norm": False},
    "flat-grads": {"flat_grads": True},
    "clone-grads": {"flat_grads": False},
    "grads-in-place": {"grads_in_place": True},
    "grads-copied": {"grads_in_place": False},
    "row-grid": {"row_grid": True},
    "persistent": {"row_grid": False},
    "glu-da": {"glu_da": True},
    "no-glu-da": {"glu_da": False},
    "glu-t": {"glu_t": True},
    "no-glu-t": {"glu_t": False},
    "glu-db": {"glu_db": True},
    "no-glu-db": {"glu_db": False},
    "rope-qkv": {"rope_qkv": True},
    "no-rope-qkv": {"rope_qkv": False},
    "o-wide": {"o_wide": True},
    "no-o-wide": {"o_wide": False},
    "adapter-first": {"adapter_first": True},
    "no-adapter-first": {"adapter_first": False},
    "defaults": {},
    # glu_lora_backward's launch settings (the kernel sweeps on an H100 were noisy).
    "glu-st3": {"glu_cfg": {"num_stages": 3}},
    "glu-auto": {"glu_cfg": {"split_m": 0}},
    "glu-split12": {"glu_cfg": {"split_m": 12}},
    "glu-wide": {"glu_cfg": {"block_i": 128, "block_m": 64, "num_warps": 8, "split_m": 4}},
    "glu-st3-split12": {"glu_cfg": {"num_stages": 3, "split_m": 12}},
    "no-residual-mlp": {"residual_mlp": False},
}


# Switch -> (module, attribute, whether captured graphs hold kernels of the old setting).
_FLAGS = {
    "fold": ("turbotune.ops.lora_group", "FOLD_ADAPTERS", True),
    "spare": ("turbotune.ops.spare_columns", "ENABLED", True),
    "add_norm": ("turbotune.ops.add_norm", "ENABLED", True),
    "flat_grads": ("turbotune.ops.graphs", "FLAT_GRAD_COPIES", False),  # runs outside graphs
    "grads_in_place": ("turbotune.ops.graphs", "GRADIENTS_IN_PLACE", True),
    "row_grid": ("turbotune.ops._triton", "ROW_GRID_WITHOUT_DW", True),
    "glu_da": ("turbotune.ops.glu_lora_backward", "ENABLED", True),
    "glu_t": ("turbotune.ops.glu_lora_forward", "ENABLED", True),
    "glu_db": ("turbotune.ops.glu_lora_backward", "FUSED_DB", True),
    "rope_qkv": ("turbotune.ops.rope_qkv", "ENABLED", True),
    "o_wide": ("turbotune.ops.lora_fold", "WIDE_WHEN_ROOM", True),
    "adapter_first": ("turbotune.ops.lora_adapter_first", "ENABLED", True),
    "glu_cfg": ("turbotune.ops.glu_lora_backward", "CONFIG", True),
    "residual_mlp": ("turbotune.patches.layers", "RESIDUAL_INTO_MLP", True),
}


def _layer_graphs(net: torch.nn.Module):
    """The model's ``ops.graphs.LayerGraphs`` (None without CUDA graphs)."""
    return next(
        (
            m.__dict__["_turbotune_graphs"]
            for m in net.modules()
            if "_turbotune_graphs" in m.__dict__
        ),
        None,
    )


_DEFAULTS: dict[str, bool] = {}  # each flag's value before the first switch


def _switch(net: torch.nn.Module, graphs: bool | None = None, **flags: bool) -> None:
    """Set ``flags`` and every other flag of ``_FLAGS`` back to its default, so that each
    variant is "the defaults plus its own settings" whatever ran before it."""
    import dataclasses
    import importlib

    recapture = False
    for name, (module, attribute, captured) in _FLAGS.items():
        mod = importlib.import_module(module)
        _DEFAULTS.setdefault(name, getattr(mod, attribute))
        value = flags.get(name, _DEFAULTS[name])
        if isinstance(value, dict):  # fields to change in a dataclass default (launch configs)
            value = dataclasses.replace(_DEFAULTS[name], **value)
        if getattr(mod, attribute) != value:
            setattr(mod, attribute, value)
            recapture |= captured
    layer_graphs = _layer_graphs(net)
    if recapture and layer_graphs is not None:  # capture anew (in the warm-up steps)
        layer_graphs.sets.clear()
        layer_graphs.seen.clear()
    if graphs is not None:
        if layer_graphs is None:
            raise SystemExit("this point has no CUDA graphs (fused_ops.cuda_graphs off?)")
        layer_graphs.disabled = None if graphs else "switched off for the A/B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios")
    parser.add_argument("scenario")
    parser.add_argument("shape")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="graphs,eager")
    args = parser.parse_args(argv)

    from profile_point import build_point  # this folder is on sys.path when run as a script

    step, batches = build_point(args.scenarios, args.scenario, args.shape, 2 + args.steps)
    tokens = statistics.fmean(b.tokens for b in batches)

    names = args.variants.split(",")
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            _switch(step.parts[0], **VARIANTS[name])
            for batch in batches[:2]:
                step(batch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            step_losses = [step(batch) for batch in batches[2:]]
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / len(step_losses))
            losses[name].append(step_losses[-1].item())
    print(
        f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, reserved "
        f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB (all variants)"
    )
    first = statistics.median(times[names[0]])
    print(f"{'variant':22s} {'ms/step':>9s} {'tokens/s':>10s} {'vs first':>9s}  last loss")
    for name in names:
        t = statistics.median(times[name])
        print(
            f"{name:22s} {1e3 * t:9.1f} {tokens / t:10.0f} {first / t:9.3f}  {losses[name][-1]:.5f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
