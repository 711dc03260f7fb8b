"""Two processes (gloo, CPU) train like one, under each sharding option of ``distributed:``:
strategies (full, hybrid, none), frozen parameters replicated outside FSDP2, one FSDP2 group for
the whole model, explicit prefetch, no resharding after forward, prefetch with checkpointing.

One pair of worker processes (``options_worker.py``) runs every variant in turn (imports paid
once, ~10 s on 2 shared cores); the single-process reference trains here meanwhile: the same
tiny NF4 + LoRA model (``TinyLM``, 2 blocks), the same global batches of 4 rows, 3 AdamW steps.

Tolerance: the sharded runs do the same fp32 operations, except that the gradient of the global
batch is the mean of two half-batch gradients (reduce-scatter or all-reduce), which reorders
fp32 sums: ~1e-7 relative on losses, ~1e-6 on weights after 3 steps of AdamW at lr 1e-2
(Adam's normalization magnifies tiny gradient differences of near-zero entries);
the test allows 1e-5 on losses and 2e-5 on weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.distributed.tiny import TinyLM, assert_close, run_two_processes, train_one_process

WORKER = Path(__file__).with_name("options_worker.py")
VARIANTS = {
    "full_shard": {},
    "hybrid_shard": {"strategy": "hybrid_shard", "shard_size": 2},
    "no_shard": {"strategy": "no_shard"},
    "prefetch2": {"prefetch": 2},
    "no_reshard": {"reshard_after_forward": False},
    "replicate_frozen": {"frozen": "replicate", "prefetch": 1},
    "replicate_frozen_model_group": {"frozen": "replicate", "groups": "model"},
    "model_group": {"groups": "model"},
    "prefetch_checkpointing": {"prefetch": 1, "activation_checkpointing": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every variant's record from the two-process world."""
    return run_two_processes(WORKER, VARIANTS, tmp_path_factory.mktemp("options"))


@pytest.fixture(scope="module")
def reference(runs) -> tuple[list[float], dict]:
    """One process, the whole global batch (computed after the workers: 2 cores)."""
    return train_one_process(TinyLM)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_processes_train_like_one(runs, reference, name):
    got = runs[name]
    ref_losses, ref_weights = reference
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (
        got["losses"], ref_losses)  # fmt: skip
    assert_close(got["weights"], ref_weights, atol=2e-5)


def test_replicated_frozen_parameters_are_not_sharded(runs):
    rec = runs["replicate_frozen"]
    assert rec["sharded"], "no trainable parameter was sharded"
    assert all("lora_" in n for n in rec["sharded"]), rec["sharded"]
    assert any(n.endswith(".packed") for n in runs["full_shard"]["sharded"])
