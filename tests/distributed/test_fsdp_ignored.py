"""``apply_fsdp(..., ignored_params=...)``: parameters FSDP2 leaves alone (expert-parallel
experts) stay plain local tensors, are neither gathered nor reduced, and the model trains like
the unsharded one; a torch without ``ignored_params`` is refused with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.distributed.test_fsdp_inprocess import (
    FP32,
    _assert_close,
    _batches,
    _tiny_llama,
    _train,
    _with_lora,
    world_of_one,  # noqa: F401 (fixture)
)

from turbotune.distributed.config import DistributedConfig


def _mlp_params(model) -> set[torch.nn.Parameter]:
    return {p for n, p in model.named_parameters() if ".mlp." in n}


def _shard_ignoring(model, world, ignored):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    mesh = build_mesh("full_shard", world, device_for(world, "cpu"))
    return apply_fsdp(model, DistributedConfig(enabled=True), FP32, mesh, ignored_params=ignored)


def test_ignored_params_stay_local_and_train_like_unsharded(world_of_one):  # noqa: F811
    ref = _with_lora(_tiny_llama())
    model = copy.deepcopy(ref)
    ignored = _mlp_params(model)
    assert any(p.requires_grad for p in ignored), "the test needs trainable ignored parameters"
    _shard_ignoring(model, world_of_one, ignored)
    for name, p in model.named_parameters():
        sharded = hasattr(p, "device_mesh")
        assert sharded != (".mlp." in name), f"{name}: sharded={sharded}"
    losses, weights = _train(model, _batches(2))
    ref_losses, ref_weights = _train(ref, _batches(2))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6), (losses, ref_losses)
    _assert_close(weights, ref_weights, atol=1e-6)


def test_torch_without_ignored_params_is_refused(world_of_one, monkeypatch):  # noqa: F811
    import torch.distributed.fsdp as fsdp

    from turbotune.errors import ConfigError

    real = fsdp.fully_shard

    def old_fully_shard(module, *, mesh=None, reshard_after_forward=None, mp_policy=None,
                        offload_policy=None):  # fmt: skip
        return real(module, mesh=mesh)

    monkeypatch.setattr(fsdp, "fully_shard", old_fully_shard)
    model = _with_lora(_tiny_llama())
    with pytest.raises(ConfigError, match="no 'ignored_params'"):
        _shard_ignoring(model, world_of_one, _mlp_params(model))
