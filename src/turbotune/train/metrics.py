"""Throughput, MFU and memory in the Trainer's logs: the one metrics callback every run uses.

Every ``logging_steps`` optimizer steps the Trainer logs its loss, learning rate and grad norm;
:class:`MetricsCallback` adds, over the window since the previous log:

- ``tokens_per_s`` (target tokens: those that carry a loss) and ``input_tokens_per_s``
  (non-padding input tokens), summed over all processes;
- ``mfu``: model FLOPs done / (time * peak * processes), a fraction; absent when the FLOPs per
  token or the device peak are unknown (CPU);
- ``peak_mem_gib`` / ``reserved_mem_gib``: the CUDA allocator's peak allocated / reserved bytes
  since the start (largest over processes); on CPU the peak and current resident-set size;
- ``step_time_s``: wall seconds per optimizer step.

Tokens come from the batches: the Trainer calls :meth:`MetricsCallback.observe_batch` for each
training micro-batch. Counting stays on the batch's device (a few tiny reductions, no
synchronization), and only the log points call ``synchronize()`` and read the numbers, so the hot
path never waits. Time spent in evaluation and checkpoint saving is left out of the window.

Each log (training and evaluation) is appended as one JSON line to ``<output_dir>/metrics.jsonl``
and printed as one compact line (:func:`format_log`) by the main process.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from turbotune.train import flops as flops_mod

__all__ = ["METRICS_FILE", "MetricsCallback", "QuietProgressCallback", "count_tokens", "format_log"]

METRICS_FILE = "metrics.jsonl"
IGNORE_INDEX = -100
GIB = 2**30

Count = int | float | torch.Tensor


def count_tokens(batch: Mapping[str, Any]) -> tuple[Count, Count | None, Count]:
    """Token counts of one collated causal-LM batch, as tensors on the batch's device.

    Args:
        batch: ``input_ids`` (B, T); optional ``attention_mask`` (B, T) with 0 on padding,
            ``position_ids`` (B, T) (padding-free batches restart them at 0 for each sequence),
            ``labels`` (B, T) with -100 where there is no loss (or ``shift_labels``).

    Returns:
        ``(input_tokens, target_tokens, context2)``: non-padding tokens; tokens that carry a
        loss (labels are shifted by one inside the model), ``None`` without labels; and the sum
        over input tokens of ``2 * position + 1``, i.e. twice the keys a token attends to under
        the ``L/2`` causal convention of :mod:`turbotune.train.flops`.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    pos = batch.get("position_ids")
    if mask is not None and mask.dim() == 2:
        mask = mask.to(torch.int64)
        n_in: Count = mask.sum()
        if pos is None:
            pos = mask.cumsum(-1) - 1
        context2: Count = ((2 * pos + 1) * mask).sum()
    else:
        n_in = ids.numel()
        if pos is None:
            length = ids.shape[-1]
            context2 = (ids.numel() // max(length, 1)) * length * length  # sum_{p<L} 2p+1 = L^2
        else:
            context2 = (2 * pos.to(torch.int64) + 1).sum()
    n_tgt: Count | None = None
    if batch.get("shift_labels") is not None:
        n_tgt = (batch["shift_labels"] != IGNORE_INDEX).sum()
    elif batch.get("labels") is not None:
        n_tgt = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    return n_in, n_tgt, context2


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    elif hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.synchronize()


def _now() -> float:
    """Wall time after the device has finished its queued work."""
    _synchronize()
    return time.perf_counter()


def _memory_gib() -> dict[str, float]:
    """Peak allocated and reserved device memory (CPU: peak and current resident set)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "peak_mem_gib": torch.cuda.max_memory_allocated() / GIB,
            "reserved_mem_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    out = {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB}
    try:
        import psutil

        out["reserved_mem_gib"] = psutil.Process().memory_info().rss / GIB
    except ImportError:  # psutil is optional: the peak alone
        pass
    return out


def _all_reduce(values: list[float], op: str) -> list[float]:
    """Sum or max of ``values`` over the processes of a distributed run (identity otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MetricsCallback(TrainerCallback):
    """Adds tokens/s, MFU and memory to the training logs; writes ``metrics.jsonl``.

    FLOPs of a micro-batch are ``flops_per_token * input_tokens + attention_flops * context``,
    where ``context`` is the number of keys its tokens attend to (``L/2`` per token for causal
    attention, read from the positions of the batch). :meth:`for_model` fills both from the model;
    give ``flops_per_token`` alone for a fixed per-token figure.

    Args:
        flops_per_token: training FLOPs per input token, without the context-dependent attention
            term when ``attention_flops`` is given; ``None``: MFU is not logged.
        attention_flops: training FLOPs per token per key attended (forward + backward).
        seq_len: context assumed for batches observed as bare counts (no positions).
        peak_flops: device peak FLOP/s; ``"auto"``: looked up for the training device
            (measured value, see :func:`turbotune.train.flops.peak_flops`).
        output_dir: folder of ``metrics.jsonl``; default: the Trainer's ``output_dir``.
        echo: print a compact line per log on the main process.
    """

    def __init__(
        self,
        flops_per_token: float | None = None,
        *,
        attention_flops: float = 0.0,
        seq_len: float | None = None,
        peak_flops: float | Literal["auto"] | None = "auto",
        output_dir: str | None = None,
        echo: bool = True,
    ) -> None:
        self.flops_per_token = flops_per_token
        self.attention_flops = attention_flops
        self.seq_len = seq_len
        self.peak_flops = peak_flops
        self.output_dir = output_dir
        self.echo = echo
        self._sums: dict[str, Count] = {}
        self._flops_unknown = False
        self._batches = 0
        self._t0: float | None = None
        self._excluded = 0.0  # seconds of evaluation/saving inside the current window
        self._pause_mark: float | None = None
        self._window_step = 0
        self._window_tokens_seen = 0
        self._done_step = -1

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        args: TrainingArguments,
        seq_len: float,
        *,
        count_recompute: bool = False,
        **kwargs: Any,
    ) -> MetricsCallback:
        """A callback whose FLOPs come from ``model.config`` and its trainable parameters.

        Args:
            model: the model as trained (a peft model counts as LoRA through its ``lora_``
                parameters).
            args: the Trainer's arguments (``gradient_checkpointing``).
            seq_len: context assumed for batches observed as bare counts.
            count_recompute: count the forward that gradient checkpointing recomputes (hardware
                FLOPs). Off: MFU counts the useful work only, comparable with and without it.
            **kwargs: passed to the constructor.
        """
        lora = flops_mod.count_lora_params(model)
        ckpt = count_recompute and bool(getattr(args, "gradient_checkpointing", False))
        try:
            per_token = flops_mod.train_flops_per_token(
                model.config, 0, trainable="lora" if lora else "full", lora_params=lora,
                checkpointing=ckpt,
            )  # fmt: skip
            attention = flops_mod.attention_flops_per_token(model.config, 1, causal=False)
        except (AttributeError, TypeError, ValueError):  # not a decoder LM config we can read
            return cls(None, seq_len=seq_len, **kwargs)
        return cls(
            per_token, attention_flops=attention * (4 if ckpt else 3), seq_len=seq_len, **kwargs
        )

    # --- the hot path -----------------------------------------------------------------------

    def observe_batch(
        self,
        batch: Mapping[str, Any] | Count,
        num_target_tokens: Count | None = None,
        *,
        flops: Count | None = None,
    ) -> None:
        """Count one training micro-batch; call it from ``Trainer.training_step``.

        Args:
            batch: the collated batch (counted by :func:`count_tokens`), or its number of
                non-padding input tokens (an int or a 0-d tensor).
            num_target_tokens: tokens that carry a loss, when ``batch`` is a count.
            flops: this micro-batch's FLOPs, replacing the estimate from the model.
        """
        if isinstance(batch, Mapping):
            n_in, n_tgt, context2 = count_tokens(batch)
        else:
            n_in, n_tgt = batch, num_target_tokens
            context2 = n_in * (self.seq_len or 0.0)  # L/2 keys per token, counted twice
        self._add("input", n_in)
        if n_tgt is not None:
            self._add("target", n_tgt)
        if flops is None and self.flops_per_token is not None:
            flops = self.flops_per_token * n_in + self.attention_flops * 0.5 * context2
        if flops is None:
            self._flops_unknown = True
        else:
            self._add("flops", flops)
        self._batches += 1

    def _add(self, key: str, value: Count) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self._sums[key] = self._sums.get(key, 0) + value  # tensors stay on device: no sync

    # --- Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args, state: TrainerState, control, **kwargs):
        if self.peak_flops == "auto":
            self.peak_flops = flops_mod.peak_flops(args.device, measured=True)
        if self.output_dir is None:
            self.output_dir = args.output_dir
        self._start_window(state, _now())

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self._mark_pause(control)

    def on_epoch_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self._mark_pause(control)

    def on_evaluate(self, args, state, control, **kwargs):
        self._end_pause()

    def on_save(self, args, state, control, **kwargs):
        self._end_pause()

    def on_log(self, args, state: TrainerState, control, logs=None, **kwargs):
        if logs is None:
            return
        self.add_metrics(logs, state)
        if state.is_world_process_zero:
            self._write(logs, state, self.output_dir or args.output_dir)
            if self.echo:
                from tqdm.auto import tqdm

                tqdm.write(format_log(logs, step=state.global_step, max_steps=state.max_steps))

    def _mark_pause(self, control: TrainerControl) -> None:
        # DefaultFlowCallback (earlier in the list) has just decided; evaluation and saving
        # follow this step's log, and are kept out of the throughput window.
        needs = control.should_evaluate or control.should_save
        self._pause_mark = _now() if needs else None

    def _end_pause(self) -> None:
        if self._pause_mark is None or self._t0 is None:
            return
        now = _now()
        self._excluded += now - self._pause_mark
        self._pause_mark = now

    def _start_window(self, state: TrainerState, now: float) -> None:
        self._t0, self._excluded = now, 0.0
        self._window_step = state.global_step
        self._window_tokens_seen = state.num_input_tokens_seen
        self._sums, self._flops_unknown, self._batches = {}, False, 0

    # --- log points ---------------------------------------------------------------------------

    def add_metrics(self, logs: dict[str, float], state: TrainerState) -> None:
        """Add this window's metrics to a training log (once per step; other logs untouched).

        ``on_log`` calls it; a Trainer subclass may call it first from ``log()`` so that every
        reporting callback (TensorBoard, W&B) sees the metrics too.
        """
        if "loss" not in logs or self._done_step == state.global_step:
            return
        self._done_step = state.global_step
        now = _now()
        if self._t0 is None:  # not started by on_train_begin: open a window, nothing to report
            self._start_window(state, now)
            return
        seconds = max(now - self._t0 - self._excluded, 1e-9)
        if self._pause_mark is not None:
            self._pause_mark = now  # the pause now belongs to the next window
        logs.update(self._window_metrics(state, seconds))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(
                {k: v for k, v in logs.items() if k not in state.log_history[-1]}
            )
        self._start_window(state, now)

    def _window_metrics(self, state: TrainerState, seconds: float) -> dict[str, float]:
        keys = ("input", "target", "flops")
        local = [float(self._sums.get(k, 0)) for k in keys]
        local.append(float(self._flops_unknown or self._batches == 0))
        n_in, n_tgt, flops, unknown = _all_reduce(local, "sum")
        out: dict[str, float] = {}
        steps = max(1, state.global_step - self._window_step)
        out["step_time_s"] = seconds / steps
        if n_in == 0 and state.num_input_tokens_seen > self._window_tokens_seen:
            # No observe_batch calls (a plain Trainer): the Trainer's own count, already global.
            n_in = state.num_input_tokens_seen - self._window_tokens_seen
            unknown = float(self.flops_per_token is None)
            ctx = n_in * (self.seq_len or 0.0) / 2
            flops = (self.flops_per_token or 0.0) * n_in + self.attention_flops * ctx
        if "target" in self._sums or n_tgt > 0:
            out["tokens_per_s"] = n_tgt / seconds
        if n_in > 0:
            out["input_tokens_per_s"] = n_in / seconds
            peak = self.peak_flops
            if not unknown and isinstance(peak, (int, float)) and peak > 0:
                out["mfu"] = flops / seconds / (peak * _world_size())
        mem = _memory_gib()
        names = sorted(mem)
        out.update(zip(names, _all_reduce([mem[k] for k in names], "max")))
        return out

    def _write(self, logs: dict[str, float], state: TrainerState, output_dir: str | None) -> None:
        if not output_dir:
            return
        os.makedirs(output_dir, exist_ok=True)
        record = {"step": state.global_step, "time": time.time(), **logs}
        with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar without its dict printout per log (the metrics line says it).

    Swap it in with ``trainer.remove_callback(ProgressCallback)`` and
    ``trainer.add_callback(QuietProgressCallback)``; with ``disable_tqdm`` remove
    ``PrinterCallback`` instead.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _si(x: float) -> str:
    """3 significant digits with a k/M suffix: 950, 10.4k, 1.23M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


# Keys shown by their own formatter, or too noisy for the console (they stay in the JSON file).
_HIDDEN = {"epoch", "input_tokens_per_s", "reserved_mem_gib", "step_time_s", "total_flos"}
_HIDDEN |= {"num_input_tokens_seen", "time", "step"}


def format_log(
    logs: Mapping[str, Any], step: int | None = None, max_steps: int | None = None
) -> str:
    """One compact console line of a log, e.g.
    ``step 20/100 | loss 1.234 | lr 2.0e-04 | gn 0.81 | 10.4k tok/s | MFU 41.2% | mem 21.7 GiB``.

    Args:
        logs: a Trainer log (training, evaluation or the final summary).
        step: the optimizer step; shown first when given.
        max_steps: the run's total steps (shown as ``step/max_steps`` when positive).
    """
    parts = []
    if step is not None:
        parts.append(f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}")
    known = {
        "loss": lambda v: f"loss {v:.4g}",
        "learning_rate": lambda v: f"lr {v:.1e}",
        "grad_norm": lambda v: f"gn {v:.3g}",
        "tokens_per_s": lambda v: f"{_si(v)} tok/s",
        "mfu": lambda v: f"MFU {100 * v:.1f}%",
        "peak_mem_gib": lambda v: f"mem {v:.1f} GiB",
    }
    for key, fmt in known.items():
        if isinstance(logs.get(key), (int, float)):
            parts.append(fmt(logs[key]))
    if "tokens_per_s" not in logs and isinstance(logs.get("input_tokens_per_s"), (int, float)):
        parts.append(f"{_si(logs['input_tokens_per_s'])} in-tok/s")
    for key, value in logs.items():
        if key in known or key in _HIDDEN:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
