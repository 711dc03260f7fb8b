"""The MLX schedules give the PyTorch path's learning rate at every step, and an MLX optimizer
applies ``lr(0)`` at its first update, as the Trainer does."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'turbotune[mlx]')")
optim = pytest.importorskip("mlx.optimizers")

from turbotune.backends.mlx.schedule import mlx_schedule  # noqa: E402
from turbotune.config import TrainConfig  # noqa: E402
from turbotune.train.schedules import lr_multiplier, resolve_warmup_steps  # noqa: E402

N = 23


@pytest.mark.parametrize(
    "name",
    ["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "exponential"],
)
@pytest.mark.parametrize("extra", [{}, {"warmup_steps": 0}, {"warmup_ratio": 0.3}])
def test_every_schedule_matches_the_pytorch_path(name, extra):
    cfg = TrainConfig(
        learning_rate=2e-3, lr_scheduler=name, min_lr_ratio=0.1, lr_num_cycles=2.0,
        lr_power=2.0, lr_gamma=0.8, **extra,
    )  # fmt: skip
    warmup = resolve_warmup_steps(cfg, N, N)
    want = np.array([2e-3 * lr_multiplier(cfg, N, warmup)(s) for s in range(N + 3)])
    schedule = mlx_schedule(cfg, N, N)
    got = np.array([schedule(mx.array(s)).item() for s in range(N + 3)])
    diff = np.abs(got - want)
    assert diff.max() < 1e-9 + 1e-5 * 2e-3, (
        f"{name} {extra}: max abs diff {diff.max():.3g} at step {diff.argmax()}, mean {diff.mean():.3g}"
    )


def test_the_optimizer_applies_lr_of_the_steps_already_taken():
    cfg = TrainConfig(learning_rate=1.0, lr_scheduler="linear", warmup_steps=2)
    opt = optim.SGD(learning_rate=mlx_schedule(cfg, 6, 6))
    param = {"w": mx.array(0.0)}
    seen = []
    for _ in range(6):
        before = param["w"].item()
        param = opt.apply_gradients({"w": mx.array(-1.0)}, param)  # w += lr
        seen.append(param["w"].item() - before)
    want = [lr_multiplier(cfg, 6, 2)(s) for s in range(6)]  # 0, 0.5, 1, 0.75, 0.5, 0.25
    np.testing.assert_allclose(seen, want, atol=1e-6)
