"""The Hugging Face Trainer, with turbotune's schedules, token accounting and atomic checkpoints.

Everything else (the loop, accelerate, gradient accumulation whose loss is normalized by the
number of target tokens of the whole optimizer step, mixed precision, checkpoint contents) is
the stock ``transformers.Trainer``: users keep the engine they know.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from turbotune.errors import ConfigError
from turbotune.train.checkpoint import STAGING, checkpoints, publish, remove_staging

if TYPE_CHECKING:
    from turbotune.config import Config, TrainConfig
    from turbotune.precision import PrecisionPlan

#: TrainingArguments fields that turbotune sets from its own keys; giving them directly in
#: ``train:`` would silently fight the turbotune key, so it is an error that names the right key.
OWNED_HF_ARGS = {
    "bf16": "train.precision", "fp16": "train.precision", "bf16_full_eval": "train.precision",
    "fp16_full_eval": "train.precision", "half_precision_backend": "train.precision",
    "lr_scheduler_type": "train.lr_scheduler", "lr_scheduler_kwargs": "train.lr_scheduler",
    "optim": "train.optimizer", "use_cpu": "backend", "no_cuda": "backend",
    "activation_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing_kwargs": "train.reentrant_checkpointing",
    "gradient_checkpointing_kwargs": "train.reentrant_checkpointing",
    "resume_from_checkpoint": "train.resume_from_checkpoint",
}  # fmt: skip


def check_owned_args(cfg: Config) -> None:
    """Refuse ``TrainingArguments`` keys in ``train:`` that a turbotune key sets.

    Raises:
        ConfigError: naming the turbotune key to use instead.
    """
    for key in cfg.train.hf_args:
        if key in OWNED_HF_ARGS:
            raise ConfigError(f"{cfg.source}: set '{OWNED_HF_ARGS[key]}' instead of 'train.{key}'")


def training_arguments(
    cfg: Config, plan: PrecisionPlan, backend: str, *, has_eval: bool
) -> TrainingArguments:
    """Translate the ``train`` section (plus pass-through keys) into ``TrainingArguments``."""
    t: TrainConfig = cfg.train
    check_owned_args(cfg)
    report = [r for r in t.report_to if r != "stdout"] or ["none"]
    kwargs: dict[str, Any] = {
        "output_dir": t.output_dir,
        "max_steps": t.max_steps,
        "num_train_epochs": t.num_train_epochs,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        **({"optim": t.optimizer} if t.optimizer else {}),
        "lr_scheduler_type": "constant",  # replaced by TurbotuneTrainer.create_scheduler
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps" if t.save_steps > 0 else "no",
        "save_steps": t.save_steps if t.save_steps > 0 else 500,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if (t.eval_steps > 0 and has_eval) else "no",
        "eval_steps": t.eval_steps if t.eval_steps > 0 else None,
        **_checkpointing_args(t),
        "report_to": report,
        "use_cpu": backend == "cpu",
        "remove_unused_columns": False,
        "save_safetensors": True,
        **plan.trainer_flags(),
    }
    kwargs.update(t.hf_args)
    if "save_safetensors" not in _accepted_args():
        kwargs.pop("save_safetensors")  # removed in newer transformers: always safetensors
    return TrainingArguments(**kwargs)


@functools.cache
def _accepted_args() -> frozenset[str]:
    return frozenset(inspect.signature(TrainingArguments.__init__).parameters)


def _checkpointing_args(t: TrainConfig) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers accepts: newer releases renamed
    ``gradient_checkpointing*`` to ``activation_checkpointing*`` and warn on the old names (which
    still read back, so plugins may keep reading ``args.gradient_checkpointing``)."""
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in _accepted_args()
        else "gradient_checkpointing"
    )
    if t.activation_offload:
        # turbotune checkpoints the layers itself (distributed/offload.py, applied by
        # run_training): transformers' checkpointing stays off, or each layer would be
        # recomputed twice. Its reentrant-style recomputation needs DDP's static graph view, as
        # the Trainer gives transformers' checkpointing (find_unused_parameters off).
        return {name: False, "ddp_find_unused_parameters": False}
    return {
        name: t.gradient_checkpointing,
        f"{name}_kwargs": {"use_reentrant": t.reentrant_checkpointing},
    }


def offloads_checkpoints(t: TrainConfig) -> bool:
    """Whether the run checkpoints its layers through turbotune's offloaded checkpoint (and
    transformers' own checkpointing is off)."""
    return t.gradient_checkpointing and t.activation_offload


class _SamplerEpochCallback(TrainerCallback):
    """Tells a plugin's batch sampler the epoch before its first batch is drawn. The Trainer's
    own ``set_epoch`` does not reach a batch sampler behind accelerate's shard and skip wrappers
    (several processes, resumed mid-epoch); a resumed run's ``state.epoch`` is
    ``epoch + fraction``, so its floor is the epoch being resumed."""

    def __init__(self, trainer: TurbotuneTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._batch_sampler
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class TurbotuneTrainer(Trainer):
    """``Trainer`` + the schedules of :mod:`turbotune.train.schedules`, token counts for the
    metrics callback, and atomic checkpoints."""

    def __init__(
        self,
        *args: Any,
        train_config: TrainConfig,
        metrics: Any = None,
        train_batch_sampler: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.train_config = train_config
        self.metrics = metrics
        # A plugin's batch sampler (multipack): built once from the training set, on first use.
        self._batch_sampler_factory = train_batch_sampler
        self._batch_sampler: Any = None
        if train_batch_sampler is not None:
            self.add_callback(_SamplerEpochCallback(self))
        if metrics is not None:
            # The metrics line replaces the progress bar's dict printout of every log.
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            from turbotune.train.metrics import QuietProgressCallback

            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(QuietProgressCallback)
            self.remove_callback(PrinterCallback)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Add tokens/s, MFU and memory before the reporters (TensorBoard, W&B) see the logs.
        if self.metrics is not None:
            self.metrics.add_metrics(logs, self.state)
        super().log(logs, *args, **kwargs)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ):
        if self.lr_scheduler is None:
            from turbotune.train.schedules import build_scheduler

            steps_per_epoch = max(1, self._steps_per_epoch())
            self.lr_scheduler = build_scheduler(
                optimizer or self.optimizer, self.train_config, num_training_steps, steps_per_epoch
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _steps_per_epoch(self) -> int:
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:
            return 1
        return max(1, batches // self.args.gradient_accumulation_steps)

    # --- a plugin's batch sampler -----------------------------------------------------------

    def train_batch_sampler(self) -> Any:
        """The plugin-provided batch sampler of the training set, or ``None``."""
        factory = self._batch_sampler_factory
        if self._batch_sampler is None and factory is not None and self.train_dataset is not None:
            self._batch_sampler = factory(self.train_dataset)
        return self._batch_sampler

    def get_train_dataloader(self):
        # Built here rather than through _get_train_sampler, whose signature and batch-sampler
        # support differ across transformers 5.x. accelerate deals the sampler's global batches
        # out to the processes (batch i to rank i % world), which the sampler is built for.
        sampler = self.train_batch_sampler()
        if sampler is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
        )
        return self.accelerator.prepare(loader)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.metrics is not None:
            self.metrics.observe_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    # --- atomic checkpoints -------------------------------------------------------------------

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if getattr(self, "_staging", False) else run_dir

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # turbotune's own LoRA layers (adapter.implementation: custom) save in the PEFT format
        # but are not a PeftModel, which the Trainer's loader would require.
        from turbotune.adapters.llama_pro import is_llama_pro_model, load_llama_pro
        from turbotune.adapters.lora import is_custom_lora_model, load_custom_lora

        target = model if model is not None else self.model
        if is_custom_lora_model(target):
            return load_custom_lora(target, resume_from_checkpoint)
        # Llama-Pro trains only its new blocks; the old ones may be 4-bit in the model and were
        # saved in another form, so only the new blocks are read back.
        if is_llama_pro_model(target):
            return load_llama_pro(target, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / name
        self._staging = True
        try:
            shutil.rmtree(staged, ignore_errors=True)
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.should_save:
            self._unstage_best_checkpoint(staged, run_dir / name)
            publish(staged, run_dir / name)
            remove_staging(run_dir)
            self._rotate(run_dir)
        if self.args.world_size > 1:
            torch.distributed.barrier()

    def _unstage_best_checkpoint(self, staged: Path, final: Path) -> None:
        """The Trainer recorded the best checkpoint under its staging path: point at the final one."""
        best = self.state.best_model_checkpoint
        if best is None or Path(best).resolve() != staged.resolve():
            return
        from transformers.trainer import TRAINER_STATE_NAME

        self.state.best_model_checkpoint = str(final)
        self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _rotate(self, run_dir: Path) -> None:
        """Keep the newest ``save_total_limit`` checkpoints (and the best one)."""
        limit = self.args.save_total_limit
        if not limit:
            return
        best = self.state.best_model_checkpoint
        for old in checkpoints(run_dir)[:-limit]:
            if best is None or Path(best).resolve() != old.resolve():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(old)
