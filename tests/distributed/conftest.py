"""Fixtures of the FSDP tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def alpaca_tiny(shared_data: Path) -> Path:
    """A few real Alpaca rows (``shared/data/alpaca``)."""
    path = shared_data / "alpaca" / "alpaca_tiny.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path
