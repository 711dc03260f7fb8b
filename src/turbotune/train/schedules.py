"""Learning-rate schedules: warmup, then constant or a decay to a floor.

Every schedule is a multiplier of the peak learning rate, ``f(step) -> float``, run by a
:class:`torch.optim.lr_scheduler.LambdaLR`. ``step`` is the number of optimizer steps already
taken, so the first update uses ``f(0)``; this is the Hugging Face convention, and so are the
shapes (``transformers.optimization``), extended with a floor ``min_lr_ratio`` on every decaying
schedule and an ``exponential`` decay, as in fsdp_qlora's ``--lr_scheduler`` options.

Warmup is linear from 0: ``f(s) = s / W`` for ``s < W``, so ``f(W) = 1`` is the peak. Its length
comes from ``warmup_steps``, ``warmup_ratio`` (of all steps) or ``warmup_epochs``; with none of
them, decaying schedules warm up for 10% of the steps and ``constant`` not at all (fsdp_qlora's
defaults). After warmup, with progress ``p = (s - W) / (N - W)`` in ``[0, 1]`` and floor ``m``:

- ``constant``: 1
- ``linear``: ``m + (1 - m)(1 - p)``
- ``cosine``: ``m + (1 - m) (1 + cos(pi p)) / 2``
- ``cosine_with_restarts``: ``m + (1 - m) (1 + cos(pi ((c p) mod 1))) / 2``, ``c`` cycles that
  each restart at the peak (hard restarts); ``m`` once ``p >= 1``
- ``polynomial``: ``m + (1 - m)(1 - p)^power``
- ``exponential``: ``max(m, gamma^(s - W))``

The multipliers are module-level functions bound with :func:`functools.partial` (no closures, no
lambdas), so the scheduler pickles and its ``state_dict`` saves in a checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from turbotune.config import TrainConfig
from turbotune.errors import ConfigError

__all__ = ["DEFAULT_WARMUP_RATIO", "build_scheduler", "lr_multiplier", "resolve_warmup_steps"]

DEFAULT_WARMUP_RATIO = 0.1
"""Warmup fraction of a decaying schedule when the config gives none (fsdp_qlora's default)."""

# Products like 0.1 * 30 land a hair above an integer (3.0000000000000004); ceil must not
# turn that into an extra warmup step.
_CEIL_SLACK = 1e-9


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _CEIL_SLACK))


def resolve_warmup_steps(cfg: TrainConfig, num_training_steps: int, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps, from whichever of the three warmup fields is set.

    Args:
        cfg: the ``train`` section; at most one of ``warmup_steps``, ``warmup_ratio`` and
            ``warmup_epochs`` is set (the config checks it).
        num_training_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (used by ``warmup_epochs`` only).

    Returns:
        Steps in ``[0, num_training_steps]``; fractions round up.
    """
    if cfg.warmup_steps is not None:
        if cfg.warmup_steps < 0:
            raise ConfigError(f"'train.warmup_steps' must be >= 0, got {cfg.warmup_steps}")
        steps = cfg.warmup_steps
    elif cfg.warmup_ratio is not None:
        if not 0.0 <= cfg.warmup_ratio <= 1.0:
            raise ConfigError(f"'train.warmup_ratio' must be in [0, 1], got {cfg.warmup_ratio}")
        steps = _ceil(cfg.warmup_ratio * num_training_steps)
    elif cfg.warmup_epochs is not None:
        if cfg.warmup_epochs < 0:
            raise ConfigError(f"'train.warmup_epochs' must be >= 0, got {cfg.warmup_epochs}")
        if steps_per_epoch <= 0:
            raise ConfigError("'train.warmup_epochs' needs a dataset of known length")
        steps = _ceil(cfg.warmup_epochs * steps_per_epoch)
    elif cfg.lr_scheduler == "constant":
        steps = 0
    else:
        steps = _ceil(DEFAULT_WARMUP_RATIO * num_training_steps)
    return min(steps, max(num_training_steps, 0))


def _progress(step: int, warmup: int, total: int) -> float:
    """Fraction of the decay phase done, clipped to [0, 1]."""
    return min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))


def _constant(step: int, *, warmup: int) -> float:
    return step / warmup if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    return min_ratio + (1.0 - min_ratio) * (1.0 - _progress(step, warmup, total))


def _cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    p = _progress(step, warmup, total)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _cosine_restarts(
    step: int, *, warmup: int, total: int, min_ratio: float, cycles: float
) -> float:
    if step < warmup:
        return step / warmup
    p = _progress(step, warmup, total)
    if p >= 1.0:
        return min_ratio
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0)))


def _polynomial(step: int, *, warmup: int, total: int, min_ratio: float, power: float) -> float:
    if step < warmup:
        return step / warmup
    return min_ratio + (1.0 - min_ratio) * (1.0 - _progress(step, warmup, total)) ** power


def _exponential(step: int, *, warmup: int, min_ratio: float, gamma: float) -> float:
    if step < warmup:
        return step / warmup
    return max(min_ratio, gamma ** (step - warmup))


def lr_multiplier(cfg: TrainConfig, num_training_steps: int, warmup: int) -> Callable[[int], float]:
    """The picklable multiplier ``f(step)`` of ``cfg.lr_scheduler`` (see the module docstring).

    Args:
        cfg: the ``train`` section (schedule name, ``min_lr_ratio``, ``lr_power``, ...).
        num_training_steps: optimizer steps of the whole run, ``N``.
        warmup: warmup steps, ``W`` (from :func:`resolve_warmup_steps`).
    """
    m = cfg.min_lr_ratio
    if not 0.0 <= m <= 1.0:
        raise ConfigError(f"'train.min_lr_ratio' must be in [0, 1], got {m}")
    name = cfg.lr_scheduler
    if name == "constant":
        return functools.partial(_constant, warmup=warmup)
    decay = {"warmup": warmup, "total": num_training_steps, "min_ratio": m}
    if name == "linear":
        return functools.partial(_linear, **decay)
    if name == "cosine":
        return functools.partial(_cosine, **decay)
    if name == "cosine_with_restarts":
        if cfg.lr_num_cycles <= 0:
            raise ConfigError(f"'train.lr_num_cycles' must be > 0, got {cfg.lr_num_cycles}")
        return functools.partial(_cosine_restarts, **decay, cycles=cfg.lr_num_cycles)
    if name == "polynomial":
        if cfg.lr_power <= 0:
            raise ConfigError(f"'train.lr_power' must be > 0, got {cfg.lr_power}")
        return functools.partial(_polynomial, **decay, power=cfg.lr_power)
    if name == "exponential":
        if not 0.0 < cfg.lr_gamma <= 1.0:
            raise ConfigError(f"'train.lr_gamma' must be in (0, 1], got {cfg.lr_gamma}")
        return functools.partial(_exponential, warmup=warmup, min_ratio=m, gamma=cfg.lr_gamma)
    valid = "constant, linear, cosine, cosine_with_restarts, polynomial, exponential"
    raise ConfigError(f"'train.lr_scheduler' is {name!r}; valid: {valid}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    num_training_steps: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate scheduler of a run; step it once per optimizer step.

    Args:
        optimizer: its param groups' ``lr`` is the peak the multiplier scales.
        cfg: the ``train`` section.
        num_training_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (for ``warmup_epochs``; 0 when unknown).
    """
    if num_training_steps < 1:
        raise ConfigError(f"a schedule needs at least 1 training step, got {num_training_steps}")
    warmup = resolve_warmup_steps(cfg, num_training_steps, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, num_training_steps, warmup)
    )
