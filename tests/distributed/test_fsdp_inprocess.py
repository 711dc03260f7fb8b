"""FSDP2 in this process (a gloo world of one): sharding, mixed precision, 4-bit storage,
activation checkpointing/offload, low-memory materialization and DCP round trips, compared with
the same model unsharded. The two-process proofs are in ``test_fsdp_multiprocess.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.distributed.tiny import FP32
from tests.distributed.tiny import assert_close as _assert_close
from tests.distributed.tiny import batches as _batches
from tests.distributed.tiny import full_trainable as _full_trainable
from tests.distributed.tiny import quantize as _quantize
from tests.distributed.tiny import tiny_llama as _tiny_llama
from tests.distributed.tiny import train as _train
from tests.distributed.tiny import with_lora as _with_lora

from turbotune.distributed.config import DistributedConfig
from turbotune.precision import PrecisionPlan


def _shard(model, world, **config):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    cfg = DistributedConfig(enabled=True, **config)
    mesh = build_mesh(cfg.strategy, world, device_for(world, "cpu"))
    apply_fsdp(model, cfg, FP32, mesh)
    assert any(hasattr(p, "device_mesh") for p in model.parameters()), "nothing was sharded"
    return model


def test_sharded_nf4_lora_trains_like_unsharded(world_of_one, eager_dequantize):
    ref = _with_lora(_quantize(_tiny_llama()))
    model = _shard(copy.deepcopy(ref), world_of_one)
    batches = _batches(2)
    losses, weights = _train(model, batches)
    ref_losses, ref_weights = _train(ref, batches)
    # The same ops in the same order in fp32.
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6), (losses, ref_losses)
    _assert_close(weights, ref_weights, atol=1e-6)


@pytest.mark.parametrize("checkpoint,offload", [(True, False), (False, True), (True, True)])
def test_checkpointed_and_offloaded_blocks_train_like_plain_ones(world_of_one, checkpoint, offload):
    ref = _with_lora(_tiny_llama())  # use_cache on: a recomputed block must not re-append keys
    model = _shard(copy.deepcopy(ref), world_of_one, activation_checkpointing=checkpoint,
                   activation_offload=offload)  # fmt: skip
    assert sum("_turbotune_block_wrapped" in m.__dict__ for m in model.modules()) == 2
    batches = _batches()
    losses, weights = _train(model, batches)
    ref_losses, ref_weights = _train(ref, batches)
    # Recomputation repeats the forward's ops bit for bit.
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6), (losses, ref_losses)
    _assert_close(weights, ref_weights, atol=1e-6)


def test_mixed_precision_refuses_storage_it_would_convert(world_of_one):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp
    from turbotune.errors import ConfigError

    model = _with_lora(_quantize(_tiny_llama()))  # storage fp32
    plan = PrecisionPlan("bf16_autocast", torch.float32, torch.bfloat16, False)
    mesh = build_mesh("full_shard", world_of_one, device_for(world_of_one, "cpu"))
    with pytest.raises(ConfigError, match=r"storage is torch\.float32 but FSDP2 gathers"):
        apply_fsdp(model, DistributedConfig(enabled=True), plan, mesh)


@pytest.mark.parametrize("strategy", ["hybrid_shard", "no_shard"])
def test_two_dimensional_meshes_train_like_unsharded(world_of_one, strategy):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    ref = _with_lora(_tiny_llama())
    model = copy.deepcopy(ref)
    mesh = build_mesh(strategy, world_of_one, device_for(world_of_one, "cpu"))
    assert mesh.mesh_dim_names == ("replicate", "shard")
    apply_fsdp(model, DistributedConfig(enabled=True, strategy=strategy), FP32, mesh)
    batches = _batches(2)
    losses, weights = _train(model, batches)
    ref_losses, ref_weights = _train(ref, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)
    _assert_close(weights, ref_weights, atol=1e-6)


def test_low_memory_materialize_equals_eager_quantization(world_of_one, tmp_path, eager_dequantize):
    """A meta model filled tensor by tensor from safetensors (and its adapters drawn after
    loading) equals the model quantized eagerly with adapters drawn at creation."""
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.loading import SafetensorsSource, build_meta_model, materialize
    from turbotune.distributed.shard import apply_fsdp

    dense = _tiny_llama()
    dense.save_pretrained(tmp_path)
    ref = _with_lora(_quantize(copy.deepcopy(dense)), seed=7)

    meta = build_meta_model(dense.config, torch.float32, quantize=True,
                            compute_dtype=torch.float32, storage_dtype=torch.float32)  # fmt: skip
    meta = _with_lora(meta, seed=123)  # on meta: these draws are discarded
    assert all(p.is_meta for p in meta.parameters())
    mesh = build_mesh("full_shard", world_of_one, device_for(world_of_one, "cpu"))
    apply_fsdp(meta, DistributedConfig(enabled=True), FP32, mesh)
    stats = materialize(meta, SafetensorsSource(tmp_path), torch.device("cpu"), seed=7)
    assert stats["tensors"] == 2 * (7 + 2) + 3 and stats["adapters"] == 14
    batches = _batches(2)
    losses, weights = _train(meta, batches)
    ref_losses, ref_weights = _train(ref, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)
    _assert_close(weights, ref_weights, atol=1e-6)


def test_dcp_round_trip_restores_parameters_and_optimizer(world_of_one, tmp_path):
    from turbotune.distributed.checkpoint import has_sharded_state, load_sharded, save_sharded
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    model = _with_lora(_tiny_llama())
    mesh = build_mesh("full_shard", world_of_one, device_for(world_of_one, "cpu"))
    apply_fsdp(model, DistributedConfig(enabled=True), FP32, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batches = _batches(3)
    _train_with(model, opt, batches[:1])
    save_sharded(model, opt, tmp_path)
    assert has_sharded_state(tmp_path)
    saved = _full_trainable(model)
    after_save = _train_with(model, opt, batches[1:])  # continues from the saved state

    with torch.no_grad():
        for p in params:
            p.mul_(0.0)  # the load must bring the values back
    for state in opt.state.values():
        state["exp_avg"].zero_()
    load_sharded(model, opt, tmp_path)
    _assert_close(_full_trainable(model), saved, atol=0.0)
    resumed = _train_with(model, opt, batches[1:])
    assert resumed == pytest.approx(after_save, rel=1e-6), (resumed, after_save)


def _train_with(model, opt, batches) -> list[float]:
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
