"""``backend: mlx``: one LoRA / 4-bit QLoRA run of a turbotune config with MLX.

The same steps as the PyTorch engine (:mod:`turbotune.train.run`), with MLX underneath: check
what MLX can run (:mod:`turbotune.backends.support`), build the data with turbotune's pipeline
(bad rows fail before the model loads), load the checkpoint with mlx-lm, quantize the base
(``mlx.nn.quantize``), add LoRA layers, train with ``mlx.optimizers.AdamW`` on the run's
schedule, evaluate, and write ``<output_dir>/final``: the PEFT adapter, the tokenizer, the run's
config, and the mlx-lm adapter in ``final/mlx``.

Numerics follow the Trainer's: the loss of an optimizer step is the sum of the token losses of
its micro-batches divided by the step's target tokens (so accumulation 1x8 = 8x1), gradients
are clipped to ``max_grad_norm``, AdamW uses bias correction (PyTorch's). The logged ``loss``
is the mean of the step losses since the previous log. Each log is one line of
``<output_dir>/metrics.jsonl`` with ``loss``, ``learning_rate``, ``grad_norm``,
``tokens_per_s``, ``input_tokens_per_s``, ``step_time_s``, ``peak_mem_gib`` (MLX's peak,
``mx.get_peak_memory``) and ``epoch``. The loss-and-gradient function is compiled
(``mx.compile``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map
from rich.markup import escape

from turbotune.backends.mlx import data as mlx_data
from turbotune.backends.mlx.export import peft_target_modules, save_mlx_adapter, save_peft_adapter
from turbotune.backends.mlx.metrics import MetricsLog
from turbotune.backends.mlx.model import (
    DTYPES,
    add_lora,
    base_weights,
    linear_paths,
    load_mlx_model,
    lora_layers,
    lora_scale,
    quantize_base,
)
from turbotune.backends.mlx.schedule import mlx_schedule
from turbotune.backends.support import check_backend_support, mlx_quantization
from turbotune.config import Config

__all__ = [
    "MLXRun", "build_mlx_run", "dequantized_base", "evaluate", "fit_mlx", "lora_arrays",
    "make_loss_and_grad", "masked_loss", "mlx_dtype", "save_final", "train_mlx",
]  # fmt: skip

_PRECISION_DTYPE = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16_autocast": "float16",
    "bf16_autocast": "bfloat16",
    "bf16_buffers_autocast": "bfloat16",
}


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(text)


def mlx_dtype(cfg: Config) -> str:
    """Dtype of the base weights: ``model.dtype``, else from ``train.precision``.

    MLX has no autocast: the ``*_autocast`` modes compute in their low-precision dtype with
    the base stored in it; ``auto`` is bfloat16 on a Metal GPU and float32 on the CPU.
    """
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if cfg.train.precision == "auto":
        return "bfloat16" if mx.default_device().type == mx.gpu else "float32"
    return _PRECISION_DTYPE[cfg.train.precision]


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    """Sum of the next-token cross-entropies over positions whose target is not -100.

    Args:
        model: maps (B, T) ids to (B, T, V) logits.
        inputs: (B, T) ids.
        targets: (B, T) next-token ids, -100 where there is no loss.
    """
    logits = model(inputs).astype(mx.float32)
    mask = targets != -100
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (ce * mask).sum()


@dataclass
class MLXRun:
    """What an MLX run trains: the model with its LoRA layers, the data, and the settings."""

    cfg: Config
    model: nn.Module
    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    model_path: Path
    adapted: list[str]
    candidates: list[str]
    notes: list[str] = field(default_factory=list)


def build_mlx_run(cfg: Config) -> MLXRun:
    """Check the config, build the data, load and quantize the model, add the LoRA layers."""
    from turbotune.data import build_datasets
    from turbotune.modeling import load_tokenizer

    notes = check_backend_support(cfg, "mlx")
    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer)
    dtype = mlx_dtype(cfg)
    model, path = load_mlx_model(cfg.model, dtype)
    quant = mlx_quantization(cfg)
    if quant is not None:
        report = quantize_base(model, *quant, skip=cfg.quantization.skip_modules)
        notes.append(f"quantized {len(report.quantized)} linear layers")
        if report.kept:
            notes.append(
                f"kept in {dtype} (input width not a multiple of {quant[2]}): "
                + ", ".join(report.kept)
            )
    candidates = linear_paths(model)
    mx.random.seed(cfg.train.seed)  # the LoRA A matrices are drawn now
    adapted = add_lora(model, cfg.adapter, compute_dtype=DTYPES[dtype])
    return MLXRun(cfg, model, tokenizer, train_ds, eval_ds, path, adapted, candidates, notes)


def dequantized_base(cfg: Config) -> dict[str, np.ndarray]:
    """The base a 4-bit MLX run trained on, dequantized, under the checkpoint's names.

    Quantization is deterministic (round to nearest per group), so loading and quantizing the
    checkpoint again as :func:`build_mlx_run` did gives the same weights; merging or evaluating
    the run's PEFT adapter on these reproduces MLX's numbers (on the original weights it differs
    by the quantization error). Without quantization: the checkpoint's weights in the run's dtype.
    """
    model, _ = load_mlx_model(cfg.model, mlx_dtype(cfg))
    quant = mlx_quantization(cfg)
    if quant is not None:
        quantize_base(model, *quant, skip=cfg.quantization.skip_modules)
    return {k: np.array(v.astype(mx.float32)) for k, v in base_weights(model).items()}


def _pad_id(tokenizer: Any) -> int:
    from turbotune.data.collators import resolve_pad_token_id

    return resolve_pad_token_id(tokenizer)


def evaluate(run: MLXRun, dataset: Any = None) -> float:
    """Mean token loss over ``dataset`` (default: the evaluation set), dropout off."""
    dataset = run.eval_ds if dataset is None else dataset
    batches = mlx_data.iterate_batches(
        dataset, run.cfg.train.per_device_train_batch_size, _pad_id(run.tokenizer), 0,
        shuffle=False,
    )  # fmt: skip
    n_batches = -(-len(dataset) // run.cfg.train.per_device_train_batch_size)
    total, tokens = 0.0, 0
    run.model.eval()
    for _, batch in zip(range(n_batches), batches):
        total += masked_loss(run.model, batch.inputs, batch.targets).item()
        tokens += batch.target_tokens
    run.model.train()
    return total / max(tokens, 1)


def _optimizer(cfg: Config, total: int, per_epoch: int) -> optim.AdamW:
    """AdamW as PyTorch defines it (bias correction on), on the run's schedule."""
    t, hf = cfg.train, cfg.train.hf_args
    return optim.AdamW(
        learning_rate=mlx_schedule(t, total, per_epoch),
        betas=[hf.get("adam_beta1", 0.9), hf.get("adam_beta2", 0.999)],
        eps=hf.get("adam_epsilon", 1e-8),
        weight_decay=t.weight_decay,
        bias_correction=True,
    )


def make_loss_and_grad(model: nn.Module, *, compiled: bool = True) -> Any:
    """``f(model, inputs, targets) -> (summed loss, grads of the trainable parameters)``.

    Compiled with ``mx.compile`` (one trace per batch shape; batches are padded to multiples
    of 8, so a run sees a few). The function reads and writes the model's parameters and draws
    dropout masks, so both the model state and the random state are declared as its inputs
    and outputs (mlx-lm's trainer does the same).
    """
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    if not compiled:
        return loss_and_grad
    state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs: mx.array, targets: mx.array) -> tuple[mx.array, Any]:
        return loss_and_grad(model, inputs, targets)

    return lambda _model, inputs, targets: step(inputs, targets)


def step_gradients(
    loss_and_grad: Any, model: nn.Module, micro_batches: list[mlx_data.Batch]
) -> tuple[Any, mx.array, int]:
    """Gradients of one optimizer step: summed token losses over its micro-batches, divided
    by the step's target tokens. Returns ``(grads, mean loss, target tokens)``."""
    grads, loss_sum = None, mx.array(0.0)
    for batch in micro_batches:
        loss, g = loss_and_grad(model, batch.inputs, batch.targets)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum = loss_sum + loss
    tokens = max(1, sum(b.target_tokens for b in micro_batches))
    return tree_map(lambda x: x / tokens, grads), loss_sum / tokens, tokens


def _train_steps(run: MLXRun, logger: MetricsLog, total: int, per_epoch: int) -> list[float]:
    """The optimization loop; returns every step's loss."""
    t = run.cfg.train
    optimizer = _optimizer(run.cfg, total, per_epoch)
    loss_and_grad = make_loss_and_grad(run.model)
    batches = mlx_data.iterate_batches(
        run.train_ds, t.per_device_train_batch_size, _pad_id(run.tokenizer), t.seed
    )
    clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    run.model.train()
    step_losses = []
    for step in range(1, total + 1):
        micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
        grads, loss, tokens = step_gradients(loss_and_grad, run.model, micro)
        grads, norm = optim.clip_grad_norm(grads, clip)
        optimizer.update(run.model, grads)
        mx.eval(run.model.parameters(), optimizer.state, loss, norm)
        step_losses.append(loss.item())
        logger.add(step_losses[-1], sum(b.input_tokens for b in micro), tokens)
        if step % max(1, t.logging_steps) == 0 or step == total:
            # After the update, the optimizer holds the rate that update used.
            logger.log(step, optimizer.learning_rate.item(), norm.item())
        if t.eval_steps and run.eval_ds is not None and step % t.eval_steps == 0 and step < total:
            paused = time.perf_counter()
            logger.write(step, {"eval_loss": evaluate(run)})
            logger.t0 += time.perf_counter() - paused  # evaluation stays out of tokens/s
    return step_losses


def fit_mlx(run: MLXRun) -> dict[str, float]:
    """Train the run's LoRA layers for the configured steps; the Trainer-like summary.

    Writes ``<output_dir>/metrics.jsonl`` (one line per log, the final evaluation included).
    """
    t = run.cfg.train
    started = time.perf_counter()
    per_epoch = mlx_data.steps_per_epoch(
        len(run.train_ds), t.per_device_train_batch_size, t.gradient_accumulation_steps
    )
    total = mlx_data.total_steps(t.max_steps, t.num_train_epochs, per_epoch)
    logger = MetricsLog(Path(t.output_dir), total, per_epoch)
    mx.reset_peak_memory()
    losses = _train_steps(run, logger, total, per_epoch)
    runtime = time.perf_counter() - started
    metrics = {"train_loss": float(np.mean(losses)), "train_runtime": runtime,
               "train_steps_per_second": total / runtime, "epoch": total / per_epoch}  # fmt: skip
    if run.eval_ds is not None:
        metrics["eval_loss"] = evaluate(run)
        logger.write(total, {"eval_loss": metrics["eval_loss"]})
    return metrics


def train_mlx(cfg: Config) -> Any:
    """Train LoRA (optionally on a 4-bit base) with MLX and save the PEFT adapter.

    Args:
        cfg: the run config with ``backend: mlx`` (see
            :func:`turbotune.backends.support.check_backend_support` for what MLX runs).

    Returns:
        A :class:`turbotune.train.run.TrainResult` (its ``trainer`` is the :class:`MLXRun`).
    """
    from turbotune.backends.detect import choose_backend
    from turbotune.train.run import FINAL, TrainResult

    _, why = choose_backend("mlx")  # refuses with the reason when MLX is not usable here
    _say(f"[bold]backend[/] mlx ({escape(why)}); [bold]dtype[/] {mlx_dtype(cfg)}")
    run = build_mlx_run(cfg)
    for note in run.notes:
        _say(f"[bold]mlx[/] {escape(note)}")
    _report_parameters(run.model, quantized=mlx_quantization(cfg) is not None)
    metrics = fit_mlx(run)
    eval_metrics = {"eval_loss": metrics.pop("eval_loss")} if "eval_loss" in metrics else {}
    if eval_metrics:
        _say(f"[bold]eval[/] loss {eval_metrics['eval_loss']:.4f}")
    out = Path(cfg.train.output_dir) / FINAL
    save_final(run, out)
    return TrainResult(out, metrics, eval_metrics, None, run)


def lora_arrays(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every LoRA layer's ``(lora_a, lora_b)`` as float32 numpy arrays, by path."""
    return {
        path: (np.array(m.lora_a.astype(mx.float32)), np.array(m.lora_b.astype(mx.float32)))
        for path, m in lora_layers(model).items()
    }


def save_final(run: MLXRun, out: Path) -> None:
    """The PEFT adapter, tokenizer and config in ``out``; the mlx-lm adapter in ``out/mlx``."""
    from turbotune.train.checkpoint import atomic_directory

    cfg, lora = run.cfg, lora_arrays(run.model)
    a = cfg.adapter
    with atomic_directory(out) as tmp:
        save_peft_adapter(
            tmp, lora, r=a.r, alpha=a.alpha, dropout=a.dropout, base_model=str(run.model_path),
            target_modules=peft_target_modules(run.adapted, run.candidates),
            use_rslora=a.use_rslora,
        )  # fmt: skip
        n_layers = len(getattr(run.model, "layers", []))
        save_mlx_adapter(
            tmp / "mlx", lora, r=a.r, scale=lora_scale(a), dropout=a.dropout,
            num_layers=n_layers or -1, base_model=str(run.model_path),
        )  # fmt: skip
        run.tokenizer.save_pretrained(str(tmp))
        (tmp / "turbotune.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _say(f"[bold]saved[/] adapter (PEFT format) to {out}; mlx-lm format in {out / 'mlx'}")


def _report_parameters(model: nn.Module, *, quantized: bool) -> None:
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    packed = " (4-bit weights counted as stored, packed)" if quantized else ""
    _say(f"[bold]parameters[/] {trainable:,} trainable of {total:,}{packed}")
