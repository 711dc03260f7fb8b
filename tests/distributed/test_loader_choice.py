"""Which loader quantizes a 4-bit FSDP run."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("low_memory", [True, False])
def test_bitsandbytes_loads_4bit_fsdp_runs_only_without_low_memory_loading(low_memory):
    """Low-memory loading quantizes into turbotune's own storage (no bitsandbytes needed); the
    plain path must still quantize through the bnb plugin, or the base would train dense."""
    from turbotune.framework import AccelerationFramework

    fw = AccelerationFramework(
        {"quantization": {"method": "nf4"}, "adapter": {"implementation": "custom"},
         "distributed": {"enabled": True, "low_memory_loading": low_memory}},
        banner=False,
    )  # fmt: skip
    assert ("bnb" in [p.name for p in fw.plugins]) is (not low_memory)
