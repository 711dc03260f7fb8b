"""Expert parallelism combined with FSDP2 on 2 CPU processes (gloo): per-step losses and every
trainable gradient (LoRA, routers, expert shards) equal a one-process run, and the trained model
is written back to the Hugging Face layout from the shards (the ranks' assertions run in
tests/moe/ep_fsdp_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.moe import ep_fsdp_worker
from tests.moe.test_expert_parallel import _free_port


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize(
    "parts", [("parity", "export"), ("trainer",), ("framework",)], ids=["api", "trainer", "config"]
)
def test_expert_parallel_with_fsdp2_two_processes(tmp_path, parts) -> None:
    """api: shard_experts + apply_fsdp(ignored_params) by hand (foreach AdamW over
    param_groups_by_kind, clip_grad_norm_mixed), then the HF-layout export; trainer: the same
    steps with FsdpTrainer's optimizer and clipping;
    config: the same parity through plugins.expert_parallel + distributed (fw.augment)."""
    # fork: the ranks inherit the imported torch/transformers (a fresh import costs ~10 s each).
    args = (2, _free_port(), str(tmp_path), "loop", parts)
    mp.start_processes(ep_fsdp_worker.run, args=args, nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({}, "needs distributed.enabled"),
        (
            {
                "distributed": {"enabled": True, "low_memory_loading": False},
                "adapter": {"method": "full"},
            },
            "frozen experts",
        ),
        ({"distributed": {"enabled": True}}, "low_memory_loading=false"),
        (
            {
                "distributed": {"enabled": True, "low_memory_loading": False},
                "adapter": {"target_parameters": ["experts.down_proj"]},
            },
            "target_parameters",
        ),
    ],
)
def test_expert_parallel_config_refuses_what_it_cannot_do(settings, match) -> None:
    import turbotune
    from turbotune.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        turbotune.AccelerationFramework({**settings, "plugins": {"expert_parallel": {}}})
