"""Shared test setup: GPU tests skip cleanly on machines without CUDA; paths to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides compile-or-interpret when a kernel is decorated (at the first import of
# turbotune.ops), so on a machine without CUDA the interpreter is switched on here, before any
# test module can import the ops. Tests that want the eager path set TRITON_INTERPRET=0.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_kernels() -> None:
    """Decorate every kernel now, under the interpreter setting above: a test that later sets
    TRITON_INTERPRET=0 (to take the eager path) must not make kernels compile for a CPU."""
    import importlib
    import pkgutil

    import turbotune.ops

    for info in pkgutil.iter_modules(turbotune.ops.__path__):
        importlib.import_module(f"turbotune.ops.{info.name}")


_import_kernels()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TURBOTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
if not SHARED_DATA.is_dir() and (REPO / "shared" / "data").is_dir():
    SHARED_DATA = REPO / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real small models and datasets; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (set TURBOTUNE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories260k(shared_data: Path) -> Path:
    """The real pretrained TinyStories Llama (260K parameters) in Hugging Face format."""
    path = shared_data / "stories260K" / "hf"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture
def single_thread():
    """``pytestmark = pytest.mark.usefixtures("single_thread")`` runs a module on one thread."""
    from tests.helpers import one_thread

    with one_thread():
        yield


@pytest.fixture
def eager_ops(monkeypatch):
    """The ops take their eager references instead of the Triton interpreter (model-level tests;
    the kernels have tests of their own, and interpreting them here would take minutes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="session")
def alpaca_tiny(shared_data: Path) -> Path:
    """A few real Alpaca rows (``shared/data/alpaca/alpaca_tiny.json``)."""
    path = shared_data / "alpaca" / "alpaca_tiny.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path
