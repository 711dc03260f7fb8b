"""Sharded checkpoints hold the trainable state only, for a model whose LM head is tied to its
embedding too (torch's ``ignore_frozen_params`` drops a shared frozen parameter under one of
its names: ``lm_head.weight`` used to stay in every checkpoint and in the gathered adapter),
with the frozen base sharded by FSDP2 or replicated outside it."""

from __future__ import annotations

import pytest
import torch
from tests.distributed.tiny import FP32, assert_close, full_trainable, tiny_llama, with_lora

from turbotune.distributed.config import DistributedConfig


def _tied_lora_model(frozen: str, world):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    model = tiny_llama(layers=1)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in Llama-3.2-1B
    model = with_lora(model)
    mesh = build_mesh("full_shard", world, device_for(world, "cpu"))
    apply_fsdp(model, DistributedConfig(enabled=True, frozen=frozen), FP32, mesh)
    return model


@pytest.mark.parametrize("frozen", ["shard", "replicate"])
def test_checkpoint_and_export_hold_no_frozen_alias(world_of_one, tmp_path, frozen):
    from torch.distributed.checkpoint import FileSystemReader

    from turbotune.distributed.checkpoint import gather_trainable, load_sharded, save_sharded

    model = _tied_lora_model(frozen, world_of_one)
    names = dict(model.named_parameters(remove_duplicate=False))
    assert names["lm_head.weight"] is names["model.embed_tokens.weight"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": torch.arange(12).view(1, 12), "labels": torch.arange(12).view(1, 12)}
    model(**batch).loss.backward()
    opt.step()
    save_sharded(model, opt, tmp_path)

    keys = FileSystemReader(str(tmp_path / "sharded")).read_metadata().state_dict_metadata
    saved = [k.removeprefix("model.") for k in keys if not k.startswith("optim.")]
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k]
    exported = gather_trainable(model)
    assert exported and all("lora_" in k for k in exported), sorted(exported)

    want = full_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()  # the load must bring the values back
    load_sharded(model, opt, tmp_path)
    assert_close(full_trainable(model), want, atol=0.0)
