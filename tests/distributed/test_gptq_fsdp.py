"""FSDP2 shards GPTQ bases: two processes (gloo, CPU) train a GPTQ + LoRA model like one process,
and each process holds half of every GPTQ layer's packed bytes between uses.

One pair of worker processes (``gptq_worker.py``) runs each variant (plain sharding; prefetch with
activation checkpointing, whose recomputed forward reads the re-gathered bytes); the reference
trains here: the same model (``tiny_gptq.gptq_tiny_lm``, buffers unpacked), the same global
batches of 4 rows, 3 AdamW steps. Tolerance as in ``test_fsdp_options.py`` (the sharded runs
average two half-batch gradients: fp32 sums reordered): 1e-5 relative on losses, 2e-5 on weights.
Without the packing, the GPTQ storage would be buffers, replicated: the byte check fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tests.distributed.tiny import assert_close, batches, run_two_processes, train_one_process

WORKER = Path(__file__).with_name("gptq_worker.py")
VARIANTS = {
    "full_shard": {},
    "prefetch_checkpointing": {"prefetch": 1, "activation_checkpointing": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every variant's record from the two-process world."""
    return run_two_processes(WORKER, VARIANTS, tmp_path_factory.mktemp("gptq_fsdp"))


@pytest.fixture(scope="module")
def reference(runs) -> tuple[list[float], dict]:
    """One process, the whole global batch, unpacked GPTQ buffers (after the workers: 2 cores)."""
    sys.path.insert(0, str(WORKER.parent))
    from tiny_gptq import gptq_tiny_lm

    return train_one_process(gptq_tiny_lm)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_processes_train_like_one(runs, reference, name):
    got = runs[name]
    ref_losses, ref_weights = reference
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (
        got["losses"], ref_losses)  # fmt: skip
    assert_close(got["weights"], ref_weights, atol=2e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_process_holds_half_of_the_gptq_bytes(runs, name):
    sys.path.insert(0, str(WORKER.parent))
    from tiny_gptq import assert_half_of_the_bytes

    assert runs[name]["device"] == "cpu"
    assert_half_of_the_bytes(runs[name])


def test_bf16_gather_leaves_the_packed_bytes_alone(world_of_one, eager_dequantize):
    """Under a bf16 mixed-precision policy FSDP2 casts every parameter to bf16 before the forward:
    the packed storage is bf16 already, so the weight each layer dequantizes in the forward (with
    the parameter unsharded) is bit-identical to the unpacked layer's."""
    sys.path.insert(0, str(WORKER.parent))
    from tiny_gptq import gptq_layers, gptq_tiny_lm

    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp
    from turbotune.precision import PrecisionPlan

    ref, model = gptq_tiny_lm(), gptq_tiny_lm()
    expected = [layer.dequantize(torch.float32) for layer in gptq_layers(ref)]
    seen: list[torch.Tensor] = []
    for layer in gptq_layers(model):
        layer.register_forward_hook(lambda m, args, out: seen.append(m.dequantize(torch.float32)))
    plan = PrecisionPlan("bf16_autocast", torch.float32, torch.bfloat16, False)
    mesh = build_mesh("full_shard", world_of_one, device_for(world_of_one, "cpu"))
    apply_fsdp(model, DistributedConfig(enabled=True), plan, mesh)
    assert all(layer.packed.dtype == torch.bfloat16 for layer in gptq_layers(model))
    batch = batches(1, rows=2)[0]
    with torch.autocast("cpu", torch.bfloat16):
        loss, ref_loss = model(**batch).loss, ref(**batch).loss
    assert len(seen) == len(expected) == 6
    for got, want in zip(seen, expected):
        assert torch.equal(got, want), f"max abs diff {(got - want).abs().max():.3g}"
    # bf16 compute either way; FSDP2 also casts the LoRA weights to bf16 (autocast does too)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
