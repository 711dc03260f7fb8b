"""``turbotune train``: one run from a config to a saved adapter or model.

The steps, in order: read the config and check everything that needs no download (the
``train`` keys turbotune owns, the checkpoint to resume from), pick the backend and precision,
activate the plugins, load the tokenizer and build the data (bad rows fail here, before a
multi-gigabyte model load), load the model (or, for the demo, build it), apply the plugins'
augmentations (adapters, then patches), train with the Hugging Face Trainer, evaluate, and write
the result atomically to ``<output_dir>/final``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from turbotune.backends import choose_backend
from turbotune.backends.support import check_backend_support
from turbotune.config import Config, load_config
from turbotune.errors import TurbotuneError
from turbotune.framework import AccelerationFramework
from turbotune.precision import PrecisionPlan, apply_precision, resolve_precision
from turbotune.train.checkpoint import atomic_directory, resolve_resume

logger = logging.getLogger("turbotune")

FINAL = "final"
"""Sub-directory of ``output_dir`` that receives the trained adapter or model."""


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    """Where the adapter (LoRA) or the model (full) was saved."""
    train_metrics: dict[str, float]
    """The Trainer's summary of the run (``train_loss``, ``train_runtime``, ...)."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """``eval_loss`` and friends, when the run had evaluation data."""
    demo_accuracy: tuple[float, float] | None = None
    """Held-out accuracy of the demo task before and after training."""
    trainer: Any = None
    """The ``TurbotuneTrainer``; ``trainer.model`` is the trained model, ``trainer.state`` the logs."""


@dataclass
class _Loaded:
    """What a run trains on: the model (before augmentation) and its data."""

    tokenizer: Any
    model: Any
    peft_config: Any
    train_ds: Any
    eval_ds: Any = None


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(text)


def resolve_run_config(
    source: str | os.PathLike | dict[str, Any] | Config | None, overrides: list[str] | None
) -> Config:
    """The run's config; with no source, the built-in demo's config (plus any overrides)."""
    if isinstance(source, Config):
        return source
    if source is None:
        from turbotune.train.demo import demo_config

        source = demo_config()
    return load_config(source, overrides)


def run_training(
    source: str | os.PathLike | dict[str, Any] | Config | None = None,
    overrides: list[str] | None = None,
    *,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Run one training job; see the module docstring for the steps.

    Args:
        source: a YAML path, a dict of sections, a :class:`Config`, or ``None`` for the demo.
        overrides: dotted ``section.key=value`` strings applied on top of ``source``.
        callbacks: extra ``transformers.TrainerCallback`` objects for the Trainer.
    """
    from transformers import set_seed

    from turbotune.train.trainer import check_owned_args, offloads_checkpoints, training_arguments

    cfg = resolve_run_config(source, overrides)
    if cfg.backend == "mlx":  # a separate engine (MLX), not the Hugging Face Trainer
        from turbotune.backends.mlx import train_mlx

        return train_mlx(cfg)
    check_owned_args(cfg)
    resume = resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    backend, plan = _backend_and_precision(cfg)
    fw = AccelerationFramework(cfg)
    demo = cfg.model.path is None
    run = _build_demo(cfg, fw) if demo else _load(cfg, fw, plan)
    # A loader plugin (4-bit), or the FSDP low-memory loader, owns the dtypes of what it loads.
    if fw.loader is None and "_turbotune_source" not in run.model.__dict__:
        apply_precision(run.model, plan)

    args = training_arguments(cfg, plan, backend, has_eval=run.eval_ds is not None)
    # The Trainer seeds only when it starts; adapters are initialized before that, and without
    # this their init would depend on whatever ran earlier in the process (or on the loader).
    set_seed(cfg.train.seed)
    model, args = fw.augment(run.model, args, run.peft_config)
    if offloads_checkpoints(cfg.train):  # in place of transformers' checkpointing
        from turbotune.distributed.activations import checkpoint_layers

        limit = cfg.train.activation_offload_layers
        n = checkpoint_layers(model, offload=True, offload_layers=limit)
        host = n if limit is None else min(n, limit)
        _say(
            f"[bold]activation offload[/] {host} of {n} checkpointed layers keep their inputs on the host"
        )
    _report_parameters(model)
    trainer = _build_trainer(cfg, fw, model, args, run, callbacks or [])

    held_out, before = _demo_accuracy_before(cfg, model, run.tokenizer) if demo else (None, None)
    if resume:
        _say(f"[bold]resuming[/] from {resume}")
    train_metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)

    eval_metrics: dict[str, float] = {}
    if run.eval_ds is not None:
        eval_metrics = trainer.evaluate()
        _say(f"[bold]eval[/] loss {eval_metrics.get('eval_loss', float('nan')):.4f}")

    demo_acc = None
    if demo:
        from turbotune.train.demo_task import demo_accuracy

        after = demo_accuracy(model, run.tokenizer, held_out)
        demo_acc = (before, after)
        _say(f"[bold]demo[/] held-out accuracy: {before:.1%} -> [bold green]{after:.1%}[/]")

    out = Path(cfg.train.output_dir) / FINAL
    if cfg.distributed.enabled:  # FSDP: every rank joins the gather, rank 0 writes below
        trainer.gather_for_save()
    if args.should_save:
        _save_final(trainer, run.tokenizer, cfg, out, adapter=run.peft_config is not None)
    return TrainResult(out, train_metrics, eval_metrics, demo_acc, trainer)


def _backend_and_precision(cfg: Config) -> tuple[str, PrecisionPlan]:
    backend, why = choose_backend(cfg.backend)
    notes = check_backend_support(cfg, backend)  # combinations this backend cannot run fail here
    plan = resolve_precision(cfg.train.precision, backend, adapters=cfg.adapter.method != "full")
    _say(f"[bold]backend[/] {backend} ({why}); [bold]precision[/] {plan.mode}")
    for note in notes:
        _say(f"[bold]note[/] {note}")
    return backend, plan


def _load(cfg: Config, fw: AccelerationFramework, plan: PrecisionPlan) -> _Loaded:
    """Tokenizer and data first (cheap, and where user errors are), then the model."""
    from turbotune.data import build_datasets
    from turbotune.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer)
    dtype = plan.weight_dtype if cfg.model.dtype == "auto" else _dtype(cfg.model.dtype)
    # A local directory is loaded by its absolute path: the saved adapter names its base by the
    # path the model was loaded from, and `turbotune merge` may run from another directory.
    local = Path(cfg.model.path).expanduser()
    path = str(local.resolve()) if local.is_dir() else cfg.model.path
    if cfg.distributed.enabled:  # FSDP: low-memory loading, shardable 4-bit storage
        from turbotune.distributed.model import load_for_fsdp

        model, peft_config = load_for_fsdp(cfg, fw, plan, path, dtype)
    else:
        model, peft_config = fw.load_model(path, dtype=dtype)
    return _Loaded(tokenizer, model, peft_config, train_ds, eval_ds)


def _build_demo(cfg: Config, fw: AccelerationFramework) -> _Loaded:
    """The demo's tokenizer, random-weight model and synthetic data (no eval split)."""
    from turbotune.train.demo import DEMO_TRAIN_EXAMPLES, build_demo_model
    from turbotune.train.demo_task import build_demo_tokenizer, demo_dataset

    if cfg.data.path is not None:
        raise TurbotuneError("data.path is set but model.path is empty: name the model to train")
    t = cfg.train
    rows = DEMO_TRAIN_EXAMPLES
    if t.max_steps > 0:  # a short run needs only the rows it will see
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
        rows = min(rows, t.max_steps * per_step)
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(tokenizer)
    train_ds = demo_dataset(tokenizer, n=rows, seed=cfg.data.seed, split="train")
    return _Loaded(tokenizer, model, fw.peft_config(), train_ds)


def _demo_accuracy_before(cfg: Config, model: Any, tokenizer: Any) -> tuple[list[Any], float]:
    from turbotune.train.demo import DEMO_EVAL_EXAMPLES
    from turbotune.train.demo_task import demo_accuracy, demo_examples

    held_out = demo_examples(
        DEMO_EVAL_EXAMPLES, seed=cfg.data.seed + 1, split="eval", distinct=True
    )
    before = demo_accuracy(model, tokenizer, held_out)
    _say(f"[bold]demo[/] held-out accuracy before training: {before:.1%}")
    return held_out, before


def _build_trainer(
    cfg: Config, fw: AccelerationFramework, model: Any, args: Any, run: _Loaded, extra: list[Any]
) -> Any:
    from turbotune.data import PaddedCollator
    from turbotune.train.metrics import MetricsCallback
    from turbotune.train.trainer import TurbotuneTrainer

    metrics = MetricsCallback.for_model(model, args, seq_len=cfg.data.max_length)
    if cfg.distributed.enabled:  # an FSDP2-sharded model: DCP checkpoints, no DDP wrapper
        from turbotune.distributed.trainer import FsdpTrainer as TurbotuneTrainer
    return TurbotuneTrainer(
        model=model,
        args=args,
        train_dataset=run.train_ds,
        eval_dataset=run.eval_ds,
        data_collator=fw.data_collator(run.tokenizer, args)
        or PaddedCollator(run.tokenizer.pad_token_id),
        processing_class=run.tokenizer,
        callbacks=[metrics, *fw.callbacks(model), *extra],
        train_config=cfg.train,
        metrics=metrics,
        train_batch_sampler=lambda dataset: fw.train_batch_sampler(dataset, args),
    )


def _save_final(trainer: Any, tokenizer: Any, cfg: Config, out: Path, *, adapter: bool) -> None:
    """The adapter (PEFT format) or model, its tokenizer and the run's config, in one rename."""
    with atomic_directory(out) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "turbotune.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _say(f"[bold]saved[/] {'adapter (PEFT format)' if adapter else 'model'} to {out}")


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _report_parameters(model) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _say(
        f"[bold]parameters[/] {trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%})"
    )
