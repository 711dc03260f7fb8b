"""``turbotune train``: one run from a config to a saved adapter or model.

The steps, in order: read the config, pick the backend and precision, activate the plugins,
load (or, for the demo, build) the model and tokenizer, build the data, apply the plugins'
augmentations (adapters, then patches), train with the Hugging Face Trainer, evaluate, and
write the result atomically to ``<output_dir>/final``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from turbotune.backends import choose_backend
from turbotune.config import Config, load_config
from turbotune.errors import TurbotuneError
from turbotune.framework import AccelerationFramework
from turbotune.precision import apply_precision, resolve_precision
from turbotune.train.checkpoint import atomic_directory, resolve_resume

logger = logging.getLogger("turbotune")

FINAL = "final"


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    """Where the adapter (LoRA) or the model (full) was saved."""
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float] = field(default_factory=dict)
    demo_accuracy: tuple[float, float] | None = None
    """Held-out accuracy of the demo task before and after training."""
    trainer: Any = None


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
) -> TrainResult:
    """Run one training job; see the module docstring for the steps."""
    cfg = resolve_run_config(source, overrides)
    backend, why = choose_backend(cfg.backend)
    if backend == "mlx":
        raise TurbotuneError("backend 'mlx' is not available in this version; use cuda, mps or cpu")
    plan = resolve_precision(cfg.train.precision, backend, adapters=cfg.adapter.method != "full")
    _say(f"[bold]backend[/] {backend} ({why}); [bold]precision[/] {plan.mode}")
    fw = AccelerationFramework(cfg)
    demo = cfg.model.path is None

    if demo:
        from turbotune.train.demo import build_demo_model
        from turbotune.train.demo_task import build_demo_tokenizer, demo_dataset

        if cfg.data.path is not None:
            raise TurbotuneError("data.path is set but model.path is empty: name the model to train")
        tokenizer = build_demo_tokenizer()
        model = build_demo_model(tokenizer)
        peft_config = fw.peft_config()
        train_ds = demo_dataset(tokenizer, n=20_000, seed=cfg.data.seed, split="train")
        eval_ds = None
    else:
        from turbotune.data import build_datasets
        from turbotune.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        dtype = plan.weight_dtype if cfg.model.dtype == "auto" else _dtype(cfg.model.dtype)
        model, peft_config = fw.load_model(dtype=dtype)
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer)
    if fw.loader is None:  # a loader plugin (4-bit) owns the dtypes of what it loads
        apply_precision(model, plan)

    from turbotune.train.trainer import TurbotuneTrainer, training_arguments

    args = training_arguments(cfg, plan, backend, has_eval=eval_ds is not None)
    model, args = fw.augment(model, args, peft_config)
    _report_parameters(model)

    from turbotune.data import PaddedCollator
    from turbotune.train.metrics import MetricsCallback

    metrics = MetricsCallback.for_model(model, args, seq_len=cfg.data.max_length)
    trainer = TurbotuneTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PaddedCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[metrics, *fw.callbacks(model)],
        train_config=cfg.train,
        metrics=metrics,
    )

    accuracy_before = None
    if demo:
        from turbotune.train.demo_task import demo_accuracy, demo_examples

        held_out = demo_examples(500, seed=cfg.data.seed + 1, split="eval")
        accuracy_before = demo_accuracy(model, tokenizer, held_out)
        _say(f"[bold]demo[/] held-out accuracy before training: {accuracy_before:.1%}")

    resume = resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    if resume:
        _say(f"[bold]resuming[/] from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    train_metrics = dict(result.metrics)

    eval_metrics: dict[str, float] = {}
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        _say(f"[bold]eval[/] loss {eval_metrics.get('eval_loss', float('nan')):.4f}")

    demo_acc = None
    if demo:
        after = demo_accuracy(model, tokenizer, held_out)
        demo_acc = (accuracy_before, after)
        _say(f"[bold]demo[/] held-out accuracy: {accuracy_before:.1%} -> [bold green]{after:.1%}[/]")

    out = Path(cfg.train.output_dir) / FINAL
    if args.should_save:
        with atomic_directory(out) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / "turbotune.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        kind = "adapter (PEFT format)" if peft_config is not None else "model"
        _say(f"[bold]saved[/] {kind} to {out}")
    return TrainResult(out, train_metrics, eval_metrics, demo_acc, trainer)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _report_parameters(model) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _say(f"[bold]parameters[/] {trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%})")
