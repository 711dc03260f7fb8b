"""The ``distributed`` section: activation of the fsdp plugin and the combinations refused up front."""

from __future__ import annotations

import pytest

from turbotune.config import load_config
from turbotune.distributed.model import check_run
from turbotune.errors import ConfigError
from turbotune.plugins import activate


def _cfg(**sections):
    base = {"model": {"path": "/models/x"}, "distributed": {"enabled": True}}
    for name, keys in sections.items():
        base.setdefault(name, {}).update(keys)
    return load_config(base)


def test_plugin_runs_last_and_only_when_enabled():
    names = [p.name for p in activate(_cfg(plugins={"fused_ops": {}}))]
    assert names[-1] == "fsdp" and "fused_ops" in names
    off = load_config({"distributed": {"enabled": False}})
    assert "fsdp" not in [p.name for p in activate(off)]


def test_unknown_key_and_bad_shard_size_are_config_errors():
    with pytest.raises(ConfigError, match=r"distributed\.stratgy"):
        load_config({"distributed": {"stratgy": "full_shard"}})
    with pytest.raises(ConfigError, match="shard_size"):
        load_config({"distributed": {"shard_size": 4}})  # only with hybrid_shard


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"train": {"gradient_checkpointing": True}}, "distributed.activation_checkpointing"),
        ({"quantization": {"method": "nf4"}}, "adapter.implementation=custom"),
        (
            {"quantization": {"method": "hqq"}, "adapter": {"implementation": "custom"}},
            "not supported with FSDP",
        ),
        ({"adapter": {"implementation": "peft"}}, "low_memory_loading"),
        ({"quantization": {"method": "gptq"}}, "low_memory_loading=false"),
        ({"adapter": {"method": "dora", "implementation": "custom"}}, "low_memory_loading"),
    ],
)
def test_unsupported_combinations_fail_before_loading(sections, message):
    with pytest.raises(ConfigError, match=message):
        check_run(_cfg(**sections))


def test_supported_combinations_pass():
    check_run(_cfg(adapter={"implementation": "custom"}, quantization={"method": "nf4"}))
    check_run(_cfg(distributed={"low_memory_loading": False}))  # peft LoRA, loaded as usual
    check_run(_cfg(adapter={"method": "full"}))
    check_run(_cfg(quantization={"method": "gptq"}, distributed={"low_memory_loading": False}))


def test_mixed_trainable_dtypes_are_refused():
    import torch

    from turbotune.distributed.config import DistributedConfig
    from turbotune.distributed.shard import apply_fsdp
    from turbotune.precision import PrecisionPlan

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    plan = PrecisionPlan("fp32", torch.float32, None, False)
    with pytest.raises(ConfigError, match="one dtype for all trainable parameters"):
        apply_fsdp(model, DistributedConfig(enabled=True), plan, mesh=None, blocks=[])
