"""Fixtures of the FSDP tests: a gloo world of one process, the eager NF4 dequantizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def world_of_one(monkeypatch):
    """A gloo process group of one process, torn down afterwards (other tests see none)."""
    import torch.distributed as dist

    from turbotune.distributed.env import _free_port, init_distributed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    yield info
    dist.destroy_process_group()
    torch.set_num_threads(before)


@pytest.fixture
def eager_dequantize(monkeypatch):
    """The eager dequantizer (the Triton one is checked against it in test_nf4_storage.py):
    interpreted Triton would cost seconds here."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
