"""``turbotune train`` under FSDP2 on two processes (gloo, CPU), beyond ``test_fsdp_multiprocess``:
a GPTQ base (its packed storage sharded, ``distributed/gptq.py``; losses and gradient norms equal
the single-process run's step for step), and padding-free batches packed by multipack."""

from __future__ import annotations

import pytest
from tests.distributed.test_fsdp_multiprocess import (
    _assert_same_steps,
    _config,
    _finish,
    _reference,
    _sharded,
    _start,
)
from tests.quant.test_gptq_training import gptq_checkpoint  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow


def test_gptq_base_two_processes_equal_one(gptq_checkpoint, alpaca_tiny, tmp_path):  # noqa: F811
    cfg = _config(
        gptq_checkpoint, alpaca_tiny, tmp_path / "gptq-lora",
        quantization={"method": "gptq", "compute_dtype": "float32"},
    )  # fmt: skip
    sharded = _sharded(cfg, low_memory_loading=False)
    sharded["train"]["output_dir"] += "-fsdp"
    proc, out = _start(tmp_path, "gptq", [sharded], nproc=2)
    try:
        ref = _reference(cfg)
    finally:
        got = _finish(proc, out)
    assert got[0]["world"] == 2 and got[0]["trainer"] == "FsdpTrainer"
    # stories260K's attention (4 projections x 5 blocks) is GPTQ; each rank holds ~half of it
    assert got[0]["gptq_packed"] == 20, got[0]
    assert got[0]["gptq_max_local_share"] <= 0.51, got[0]
    _assert_same_steps(got[0], ref, rel=1e-5)


def test_padding_free_multipack_run_under_fsdp(stories260k, alpaca_tiny, tmp_path):
    """Padding-free batches packed by the multipack sampler train under FSDP2 on 2 processes
    (the sampler balances tokens over the ranks, so the batches, and hence the losses, are not
    those of one process: the run must finish with finite, falling losses)."""
    import math

    cfg = _config(stories260k, alpaca_tiny, tmp_path / "multipack")
    cfg["plugins"] = {"padding_free": {}, "multipack": {}}
    cfg["train"]["max_steps"] = 6
    sharded = _sharded(cfg, low_memory_loading=False)
    proc, out = _start(tmp_path, "multipack", [sharded], nproc=2)
    got = _finish(proc, out)[0]
    losses = [got["losses"][k] for k in sorted(got["losses"], key=int)]
    assert got["world"] == 2 and got["trainer"] == "FsdpTrainer"
    assert got["batch_sampler"] == "MultipackBatchSampler", got
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[3:]) < sum(losses[:3]), losses
