"""turbotune's learning-rate schedules as ``mlx.optimizers`` schedules.

The formulas are those of :mod:`turbotune.train.schedules` (linear warmup from 0 to the peak
over ``W`` steps, then a decay with floor ``m`` over the remaining ``N - W`` steps), built from
MLX's own pieces where they exist: ``linear_schedule`` for the warmup, joined by
``join_schedules`` at step ``W`` to ``cosine_decay`` / ``linear_schedule`` /
``exponential_decay``; ``polynomial`` and ``cosine_with_restarts`` have no MLX counterpart and are
written here with ``mx`` ops. An MLX optimizer evaluates its schedule at the number of updates
already made, so the first update uses ``f(0)``, as the PyTorch path does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

from turbotune.config import TrainConfig
from turbotune.errors import ConfigError
from turbotune.train.schedules import lr_multiplier, resolve_warmup_steps

__all__ = ["mlx_schedule"]

Schedule = Callable[[mx.array], mx.array]


def _polynomial(peak: float, floor: float, steps: int, power: float) -> Schedule:
    def schedule(step: mx.array) -> mx.array:
        left = 1.0 - mx.minimum(step, steps) / steps
        return floor + (peak - floor) * left**power

    return schedule


def _cosine_restarts(peak: float, floor: float, steps: int, cycles: float) -> Schedule:
    def schedule(step: mx.array) -> mx.array:
        p = mx.minimum(step, steps) / steps
        phase = mx.remainder(cycles * p, 1.0)
        value = floor + (peak - floor) * 0.5 * (1.0 + mx.cos(math.pi * phase))
        return mx.where(p >= 1.0, floor, value)

    return schedule


def _exponential(peak: float, floor: float, gamma: float) -> Schedule:
    decay = optim.exponential_decay(peak, gamma)

    def schedule(step: mx.array) -> mx.array:
        return mx.maximum(decay(step), floor)

    return schedule


def _decay(cfg: TrainConfig, peak: float, steps: int) -> Schedule:
    """The schedule after warmup, over ``steps`` steps (its own step count starts at 0)."""
    lr_multiplier(cfg, steps, 0)  # validates the schedule's parameters with the same messages
    floor = cfg.min_lr_ratio * peak
    name = cfg.lr_scheduler
    if name == "constant":
        return lambda step: mx.array(peak, dtype=mx.float32)
    if name == "linear":
        return optim.linear_schedule(peak, floor, steps)
    if name == "cosine":
        return optim.cosine_decay(peak, steps, end=floor)
    if name == "cosine_with_restarts":
        return _cosine_restarts(peak, floor, steps, cfg.lr_num_cycles)
    if name == "polynomial":
        return _polynomial(peak, floor, steps, cfg.lr_power)
    if name == "exponential":
        return _exponential(peak, floor, cfg.lr_gamma)
    raise ConfigError(f"'train.lr_scheduler' is {name!r}: no MLX schedule for it")


def mlx_schedule(cfg: TrainConfig, num_training_steps: int, steps_per_epoch: int) -> Schedule:
    """The learning rate ``lr(step)`` of a run for ``mlx.optimizers`` (``learning_rate=``).

    Args:
        cfg: the ``train`` section (``learning_rate`` is the peak).
        num_training_steps: optimizer steps of the whole run, ``N``.
        steps_per_epoch: optimizer steps per epoch (for ``warmup_epochs``).

    Returns:
        A function of the step (an ``mx.array``) equal to ``learning_rate * f(step)``, ``f`` the
        multiplier of :func:`turbotune.train.schedules.lr_multiplier`.
    """
    if num_training_steps < 1:
        raise ConfigError(f"a schedule needs at least 1 training step, got {num_training_steps}")
    peak = cfg.learning_rate
    warmup = resolve_warmup_steps(cfg, num_training_steps, steps_per_epoch)
    decay = _decay(cfg, peak, max(1, num_training_steps - warmup))
    if warmup == 0:
        return decay
    ramp = optim.linear_schedule(0.0, peak, warmup)
    return optim.join_schedules([ramp, decay], [warmup])
