"""Bench tests: one CPU thread, here and in the worker processes.

Tiny models gain nothing from a second thread, and on a machine shared by several test runs two
OpenMP threads contending for two cores make each step ~100x slower than one thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_env():
    """The same for module-scoped fixtures (autouse fixtures are function-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
