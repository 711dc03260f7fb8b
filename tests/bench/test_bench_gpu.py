"""``turbotune bench`` on a GPU: the QLoRA baselines and turbotune at a 2-layer Llama-3.1-8B
shape, each point in its own process (run with ``pytest -m gpu`` on the GPU machine)."""

from __future__ import annotations

import pytest
import yaml

from turbotune.bench.cli import main
from turbotune.bench.report import read_csv

pytestmark = pytest.mark.gpu

SCENARIOS = {
    "baseline": "hf-qlora",
    "defaults": {
        "models": ["llama-3.1-8b@layers=2"],
        "shapes": ["2x512", "2x512+gc"],
        "warmup": 2,
        "steps": 3,
        "precision": "bf16",
        "timeout": 600,
    },
    "scenarios": [
        "hf-qlora",
        "hf-qlora-kbit",
        {"name": "turbotune-qlora", "config": {"quantization": {"method": "nf4"}}},
    ],
}


def test_qlora_scenarios_on_gpu(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(SCENARIOS))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--no-progress"]) == 0
    rows = read_csv(out / "results.csv")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    by = {(r["scenario"], r["gradient_checkpointing"]): r for r in rows}
    for gc in (False, True):
        base, ours = by[("hf-qlora", gc)], by[("turbotune-qlora", gc)]
        # same packed weights, adapters and batches: the same losses (bf16 noise only)
        diff = max(abs(a - b) for a, b in zip(base["losses"], ours["losses"]))
        assert diff < 1e-2, (gc, base["losses"], ours["losses"])
        # fp32 upcasts of the embeddings and the head cost memory
        assert by[("hf-qlora-kbit", gc)]["peak_allocated_gib"] > base["peak_allocated_gib"]
        if base["peak_flops"]:  # GPUs with a known peak
            assert 0 < base["mfu"] < 1, base["mfu"]
        assert base["device_name"] and "cpu" not in base["device_name"]
    assert (
        by[("hf-qlora", True)]["peak_allocated_gib"] < by[("hf-qlora", False)]["peak_allocated_gib"]
    )
