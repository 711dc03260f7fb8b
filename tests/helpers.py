"""Helpers the tests share: the plain training loop (AdamW over the trainable parameters, one step
per batch, the loss of every step returned: ``train_steps``), one torch thread, and running a
Triton compile script for an H100 ahead of time (``compile_script``, ``assert_compiles``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread. The models in the tests are tiny, and on a shared 2-core machine a
    second OpenMP thread waits for a busy core at every op: measured 0.34 ms -> 41 ms per small
    matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_steps(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    lr: float = 1e-3,
    *,
    seed: int | None = None,
    train_mode: bool = False,
) -> list[float]:
    """Train ``model`` one AdamW step per batch and return the losses.

    Args:
        batches: ``input_ids`` tensors (their own labels) or ``(input_ids, labels)`` pairs.
        lr: AdamW learning rate.
        seed: when set, ``torch.manual_seed(seed + step)`` before each step (dropout masks that
            two models must share).
        train_mode: call ``model.train()`` first (``from_pretrained`` returns eval mode).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if train_mode:
        model.train()
    losses = []
    for step, batch in enumerate(batches):
        ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
        if seed is not None:
            torch.manual_seed(seed + step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def compile_script(script: str, stdin: str | None = None, timeout: int = 600):
    """Run ``script`` (Python that calls ``triton.compile`` for a named target, e.g. sm_90) in a
    fresh interpreter without ``TRITON_INTERPRET``: kernels this process decorated for the
    interpreter cannot be compiled, and CPU-only CI catches with Triton's bundled ``ptxas`` what
    the interpreter accepts but the compiler rejects. Returns the ``CompletedProcess``."""
    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences Triton 3.9's default-change warning
    return subprocess.run(
        [sys.executable, "-c", script], input=stdin, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def assert_compiles(script: str) -> None:
    """:func:`compile_script` ran and its last printed line is ``ok``."""
    done = compile_script(script)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
