"""The ``turbotune`` command line: argument parsing only; the work happens in the layers below.

Verbs: ``train``, ``bench``, ``merge``, ``generate``, ``configs``, ``plugins``, ``arguments``, ``env``,
``convert-adapter``.
Errors caused by the user's input (:class:`turbotune.errors.TurbotuneError`) print one clean
message and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from turbotune import __version__
from turbotune.errors import TurbotuneError

CONFIG_DIR_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "configs",  # a source checkout
    Path(sys.prefix) / "share" / "turbotune" / "configs",
)


def configs_dir() -> Path:
    for path in CONFIG_DIR_CANDIDATES:
        if (path / "catalog.yaml").is_file():
            return path
    raise TurbotuneError("the sample configurations (configs/catalog.yaml) were not found")


def load_catalog() -> dict[str, dict[str, Any]]:
    catalog = yaml.safe_load((configs_dir() / "catalog.yaml").read_text()) or {}
    return catalog.get("configs", {})


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a sample configuration from the catalog."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    catalog = load_catalog()
    if name_or_path in catalog:
        return configs_dir() / catalog[name_or_path]["file"]
    raise TurbotuneError(
        f"'{name_or_path}' is neither a file nor a sample configuration; samples: "
        f"{', '.join(catalog)} (see `turbotune configs`)"
    )


# --- verbs ----------------------------------------------------------------------------------


def cmd_configs(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    root = configs_dir()
    for i, (name, entry) in enumerate(catalog.items(), 1):
        plugins = entry.get("plugins") or []
        print(f"{i:>2}. {name} ({entry['file']}) - plugins: {plugins}")
        print(f"    {entry.get('description', '')}")
    print(f"\nFiles in {root}. Use one with: turbotune train NAME-or-FILE [key=value ...]")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from turbotune.plugins import discover

    print(f"{'plugin':<14} {'runs here':<10} {'install':<34} description")
    for name, cls in sorted(discover().items(), key=lambda kv: (kv[1].order, kv[0])):
        missing = cls.missing()
        status = "yes" if not missing else "no"
        install = (
            missing[0].install_command()
            if missing
            else (
                f"pip install 'turbotune[{cls.requires[0].extra}]'"
                if cls.requires and cls.requires[0].extra
                else "(built in)"
            )
        )
        models = "" if cls.model_types is None else f" [models: {', '.join(cls.model_types)}]"
        print(f"{name:<14} {status:<10} {install:<34} {cls.description}{models}")
    return 0


def cmd_arguments(args: argparse.Namespace) -> int:
    from turbotune.config import AdapterConfig, QuantizationConfig, TrainConfig, load_config
    from turbotune.configtools import field_docs

    path = resolve_config_path(args.name)
    cfg = load_config(path)
    catalog = load_catalog()
    entry = catalog.get(args.name) or next(
        (e for e in catalog.values() if e["file"] == path.name), {}
    )
    keys = entry.get("arguments") or []
    sections = {"train": (cfg.train, TrainConfig), "adapter": (cfg.adapter, AdapterConfig),
                "quantization": (cfg.quantization, QuantizationConfig)}  # fmt: skip
    print(f"The arguments that {path.name} needs to work as intended:")
    for key in keys:
        section, _, field = key.partition(".")
        obj, cls = sections[section]
        value = getattr(obj, field) if hasattr(obj, field) else obj.hf_args.get(field)
        print(f"  {key}={value}\n      {field_docs(cls).get(field, '')}")
    if cfg.plugins:
        print("Plugins: " + ", ".join(cfg.plugins))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from turbotune.backends import choose_backend, detect_backends, package_versions
    from turbotune.plugins import discover

    found = detect_backends()
    print(f"turbotune {__version__}, Python {sys.version.split()[0]}")
    print("\nBackends:")
    for info in found.values():
        print(f"  {info.name:<5} {'yes' if info.available else 'no ':<4} {info.detail}")
        for dev in info.devices if info.name == "cuda" else []:
            print(f"        {dev}")
    name, why = choose_backend("auto", found)
    print(f"  -> backend: auto picks '{name}' ({why})")
    print("\nPackages:")
    for pkg, version in package_versions().items():
        print(f"  {pkg:<14} {version or '-'}")
    print("\nPlugins that can run here:")
    for pname, cls in sorted(discover().items()):
        missing = cls.missing()
        print(
            f"  {pname:<14} {'yes' if not missing else 'no (' + missing[0].install_command() + ')'}"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from turbotune.train.run import run_training

    if getattr(args, "nproc", None):  # N processes under torchrun, each running this verb
        from turbotune.distributed.launch import launch, torchrun_command

        words = [args.config, *args.overrides] if args.config else list(args.overrides)
        cmd = torchrun_command(words, args.nproc, nnodes=args.nnodes,
                               rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)  # fmt: skip
        print("turbotune: " + " ".join(cmd), file=sys.stderr)
        return launch(cmd)

    path = resolve_config_path(args.config) if args.config else None
    backend = [f"backend={args.backend}"] if getattr(args, "backend", None) else []
    run_training(path, [*args.overrides, *backend])  # --backend wins over backend= overrides
    return 0


def cmd_convert_adapter(args: argparse.Namespace) -> int:
    from turbotune.backends.mlx.export import convert_mlx_adapter

    out = convert_mlx_adapter(args.adapter, args.out, base_model=args.base)
    print(f"PEFT adapter written to {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from turbotune.train.merge import merge_adapter

    merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged model written to {args.out}")
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from turbotune.expand import expand_checkpoint

    plan = expand_checkpoint(
        args.model, args.out, new_blocks=args.new_blocks, expansion_rate=args.expansion_rate
    )
    print(
        f"expanded {plan.num_layers - len(plan.new)} -> {plan.num_layers} blocks "
        f"(new, identity-initialized: {list(plan.new)}) written to {args.out}"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from turbotune.quant.gptq import GPTQSpec
    from turbotune.quant.gptq_quantize import quantize_checkpoint

    try:
        spec = GPTQSpec(args.bits, args.group_size, args.sym, args.desc_act, args.damp)
    except ValueError as err:
        raise TurbotuneError(str(err)) from None
    out = quantize_checkpoint(
        args.model, args.out, spec, calibration=args.calibration, samples=args.samples,
        seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, device=args.device,
        dtype=args.dtype, gguf_file=args.gguf_file, tokenizer=args.tokenizer,
    )  # fmt: skip
    print(f"GPTQ {args.bits}-bit checkpoint written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from turbotune.train.merge import generate

    print(
        generate(args.model, args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens)
    )
    return 0


# --- parser ---------------------------------------------------------------------------------


def _split_overrides(args: argparse.Namespace) -> None:
    """``turbotune train [CONFIG] [key=value ...]``: the first non-override word is the config."""
    words = list(getattr(args, "words", []) or [])
    args.config = None
    if words and "=" not in words[0]:
        args.config = words.pop(0)
    bad = [w for w in words if "=" not in w]
    if bad:
        raise TurbotuneError(f"expected key=value overrides after the config, got {bad}")
    args.overrides = words


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbotune",
        description="Fast, cheap fine-tuning of LLMs on the Hugging Face Trainer.",
    )
    parser.add_argument("--version", action="version", version=f"turbotune {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = verb("train", cmd_train, "train a model (no config: the built-in demo)")
    p.add_argument("words", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a config file or sample name, then dotted overrides (train.max_steps=10)")  # fmt: skip
    p.add_argument("--nproc", type=int, help="start N processes per node under torchrun (FSDP: "
                   "set distributed.enabled=true); give options before the config or after all words")  # fmt: skip
    p.add_argument("--nnodes", default="1", help="nodes of a torchrun run (with --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", help="host:port of the torchrun rendezvous (several nodes)")
    p.add_argument("--rdzv-id", help="rendezvous id shared by the nodes (e.g. $SLURM_JOB_ID)")
    p.add_argument("--backend", choices=["auto", "cuda", "cpu", "mps", "mlx"],
                   help="compute backend, as the override backend=NAME (put it before the config "
                        "or after the overrides)")  # fmt: skip
    from turbotune.bench.cli import add_bench_parser

    add_bench_parser(sub)
    p = verb("merge", cmd_merge, "merge a LoRA adapter into its base model and save it")
    p.add_argument(
        "adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p = verb("expand", cmd_expand,
             "Llama-Pro: interleave identity-initialized copies of decoder blocks into a checkpoint")  # fmt: skip
    p.add_argument("model", help="model directory (safetensors) or Hugging Face id")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--new-blocks", type=int, help="number of blocks to add")
    group.add_argument("--expansion-rate", type=float, help="new blocks per original one (0.25)")
    p.add_argument("--out", required=True, help="output directory of the expanded checkpoint")
    p = verb("quantize", cmd_quantize, "quantize a model and write a standard checkpoint")
    q = p.add_subparsers(dest="method", required=True, metavar="METHOD").add_parser(
        "gptq", help="GPTQ (layer by layer, calibrated on text)", description="GPTQ quantization"
    )
    q.add_argument("model", help="model directory or Hugging Face id")
    q.add_argument("--out", required=True, help="output directory of the GPTQ checkpoint")
    q.add_argument("--calibration", required=True, help="calibration text (.txt, .json, .jsonl)")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=128, help="columns per group; -1: per row")
    q.add_argument("--desc-act", action="store_true", help="act-order (columns by Hessian diag)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="(default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric zero points")
    q.add_argument("--samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    q.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    q.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", help="where layers are quantized (default: cuda if available)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--gguf-file", help="load the weights from this GGUF file in MODEL")
    q.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p = verb("generate", cmd_generate, "complete a prompt with a model, optionally with an adapter")
    p.add_argument("model", help="model id or directory")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--max-new-tokens", type=int, default=64)
    verb("configs", cmd_configs, "list the sample configurations and the plugins each needs")
    verb(
        "plugins", cmd_plugins, "list the plugins, whether each can run here, and how to install it"
    )
    p = verb("arguments", cmd_arguments, "show the arguments a sample configuration needs")
    p.add_argument("name", help="sample configuration name (see `turbotune configs`) or file")
    verb("env", cmd_env, "report backends, GPUs, package versions and runnable plugins")
    p = verb("convert-adapter", cmd_convert_adapter,
             "convert an mlx-lm LoRA adapter directory into a PEFT adapter")  # fmt: skip
    p.add_argument("adapter", help="mlx-lm adapter directory (adapters.safetensors + adapter_config.json)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory of the PEFT adapter")
    p.add_argument("--base", help="base model to record (default: the one in the mlx-lm config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(words)
    args.argv = ["turbotune", *words]  # the command line, as recorded by `bench` in env.json
    try:
        if args.verb == "train":
            _split_overrides(args)
        return args.fn(args)
    except TurbotuneError as err:
        print(f"turbotune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
