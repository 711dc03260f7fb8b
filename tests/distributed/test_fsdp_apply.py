"""What ``apply_fsdp`` builds, in one process: ``ignored_params`` (parameters FSDP2 leaves alone,
e.g. expert-parallel experts) stay plain local tensors and the model trains like the unsharded
one, a torch without ``ignored_params`` is refused clearly; the FSDP2 groups and prefetch lists
of the ``groups``/``prefetch``/``frozen`` options; the options refused by validation. Their
numerical parity on two processes is in ``test_fsdp_options.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.distributed.tiny import FP32, assert_close, batches, tiny_llama, train, with_lora

from turbotune.distributed.config import DistributedConfig


def _mlp_params(model) -> set[torch.nn.Parameter]:
    return {p for n, p in model.named_parameters() if ".mlp." in n}


def _shard_ignoring(model, world, ignored):
    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    mesh = build_mesh("full_shard", world, device_for(world, "cpu"))
    return apply_fsdp(model, DistributedConfig(enabled=True), FP32, mesh, ignored_params=ignored)


def test_ignored_params_stay_local_and_train_like_unsharded(world_of_one):
    ref = with_lora(tiny_llama())
    model = copy.deepcopy(ref)
    ignored = _mlp_params(model)
    assert any(p.requires_grad for p in ignored), "the test needs trainable ignored parameters"
    _shard_ignoring(model, world_of_one, ignored)
    for name, p in model.named_parameters():
        sharded = hasattr(p, "device_mesh")
        assert sharded != (".mlp." in name), f"{name}: sharded={sharded}"
    losses, weights = train(model, batches(2))
    ref_losses, ref_weights = train(ref, batches(2))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6), (losses, ref_losses)
    assert_close(weights, ref_weights, atol=1e-6)


def test_torch_without_ignored_params_is_refused(world_of_one, monkeypatch):
    import torch.distributed.fsdp as fsdp

    from turbotune.errors import ConfigError

    real = fsdp.fully_shard

    def old_fully_shard(module, *, mesh=None, reshard_after_forward=None, mp_policy=None,
                        offload_policy=None):  # fmt: skip
        return real(module, mesh=mesh)

    monkeypatch.setattr(fsdp, "fully_shard", old_fully_shard)
    model = with_lora(tiny_llama())
    with pytest.raises(ConfigError, match="no 'ignored_params'"):
        _shard_ignoring(model, world_of_one, _mlp_params(model))


def _fsdp_state(module):
    # FSDP2's per-module state (private; the prefetch lists have this name in torch 2.4-2.13).
    return module._get_fsdp_state()


def _build(world, **config):
    from tests.distributed.tiny import TinyLM

    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.shard import apply_fsdp

    model = TinyLM(layers=4)
    cfg = DistributedConfig(enabled=True, **config)
    cfg.validate()
    apply_fsdp(model, cfg, FP32, build_mesh(cfg.strategy, world, device_for(world, "cpu")))
    return model


def test_prefetch_lists_reach_depth_blocks_ahead(world_of_one):
    model = _build(world_of_one, prefetch=2)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        fwd = _fsdp_state(block)._states_to_forward_prefetch
        bwd = _fsdp_state(block)._states_to_backward_prefetch
        assert fwd == [_fsdp_state(b) for b in blocks[i + 1 : i + 3]], f"block {i} forward"
        assert bwd == [_fsdp_state(b) for b in blocks[max(0, i - 2) : i][::-1]], f"block {i} back"
    assert _fsdp_state(model)._states_to_forward_prefetch == [_fsdp_state(b) for b in blocks[:2]]
    default = _build(world_of_one)
    assert not _fsdp_state(default.layers[0])._states_to_forward_prefetch


def test_model_group_is_one_fsdp_group(world_of_one):
    from torch.distributed.fsdp import FSDPModule

    model = _build(world_of_one, groups="model", frozen="replicate")
    assert [n for n, m in model.named_modules() if isinstance(m, FSDPModule)] == [""]
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "device_mesh")]
    assert sharded and all("lora_" in n for n in sharded), sharded
    assert len(sharded) == 4 * 3 * 2  # blocks x linears x (A, B)


@pytest.mark.parametrize(
    "config,message",
    [({"prefetch": -1}, "prefetch"), ({"frozen": "replicate", "cpu_offload": True}, "frozen")],
)
def test_invalid_option_combinations_are_refused(config, message):
    from turbotune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        DistributedConfig(enabled=True, **config).validate()


def test_shard_model_leaves_the_recorded_ignored_set_alone(world_of_one):
    from tests.distributed.tiny import TinyLM

    from turbotune.distributed.model import IGNORED_KEY, shard_model

    model = TinyLM(layers=2)
    ignored = {p for n, p in model.named_parameters() if n.startswith("layers.1.")}
    model.__dict__[IGNORED_KEY] = ignored
    shard_model(model, DistributedConfig(enabled=True), FP32, backend="cpu")
    for name, p in model.named_parameters():
        assert hasattr(p, "device_mesh") != name.startswith("layers.1."), name


@pytest.mark.parametrize("frozen", ["replicate", "shard"])
def test_low_memory_loading_keeps_a_tied_head_tied(
    world_of_one, tmp_path, eager_dequantize, frozen
):
    """``to_empty`` unties shared parameters that FSDP2 does not manage; the loader re-ties
    them (a tied head left unloaded made every logit equal)."""
    from tests.distributed.tiny import with_lora
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbotune.distributed.env import build_mesh, device_for
    from turbotune.distributed.loading import SafetensorsSource, build_meta_model
    from turbotune.distributed.model import materialize_tied
    from turbotune.distributed.shard import apply_fsdp

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    meta = with_lora(build_meta_model(cfg, torch.float32, quantize=True, compute_dtype=torch.float32,
                                      storage_dtype=torch.float32))  # fmt: skip
    config = DistributedConfig(enabled=True, frozen=frozen)
    apply_fsdp(
        meta, config, FP32, build_mesh("full_shard", world_of_one, device_for(world_of_one, "cpu"))
    )
    materialize_tied(meta, SafetensorsSource(tmp_path), torch.device("cpu"), seed=3)
    head, embed = meta.lm_head.weight, meta.model.embed_tokens.weight
    assert head is embed, "the head is no longer tied to the embeddings"
    full = embed.full_tensor() if hasattr(embed, "full_tensor") else embed
    saved = SafetensorsSource(tmp_path).get(
        "model.embed_tokens.weight", (96, 32), torch.device("cpu")
    )
    d = (full - saved).abs()
    assert d.max() == 0, f"embeddings: max abs diff {d.max():.3g}, mean {d.mean():.3g}"
