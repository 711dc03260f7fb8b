"""The expert-parallel plugin: MoE experts split over the processes, the rest under FSDP2.

``plugins.expert_parallel`` with ``distributed.enabled``: each process keeps ``E / world`` experts
of every MoE layer and tokens travel to their experts by all-to-all
(:mod:`turbotune.moe.expert_parallel`); FSDP2 (the ``fsdp`` plugin, which runs after this one)
shards everything else and leaves the expert shards alone: they are handed to it as the model's
``_turbotune_fsdp_ignored`` set, which ``distributed.model.shard_model`` passes to
``apply_fsdp(ignored_params=...)``. Refused: trainable experts (``adapter.method: full``: the
Trainer's gradient clipping and DCP checkpoints would see per-rank tensors under one name),
expert LoRA (``adapter.target_parameters``) and low-memory loading (each rank must hold the
whole, dense model when it splits it). On a 4-bit model, ``fused_ops`` then stores each rank's
expert shards in NF4 (QLoRA with expert parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from turbotune.errors import ConfigError
from turbotune.patches.families import FAMILIES

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments

    from turbotune.config import Config


@dataclass
class ExpertParallelConfig:
    backend: Literal["auto", "triton", "grouped_mm", "mm_loop", "loop"] = "auto"
    """Expert kernels for the rows each process receives (as ``plugins.fused_ops.moe_backend``)."""


def check_config(cfg: Config) -> None:
    """Refuse what expert parallelism does not support, before anything is loaded."""
    d, a = cfg.distributed, cfg.adapter
    if d is None or not d.enabled:
        raise ConfigError(
            "plugins.expert_parallel needs distributed.enabled: FSDP2 shards the rest of the "
            "model (and averages its gradients) while the experts are split by expert"
        )
    if a.target_parameters:
        raise ConfigError("expert LoRA (adapter.target_parameters) with expert parallelism")
    if d.low_memory_loading:
        raise ConfigError(
            "plugins.expert_parallel splits the loaded experts: set "
            "distributed.low_memory_loading=false"
        )
    if a.method == "full":
        raise ConfigError(
            "plugins.expert_parallel trains adapters on frozen experts (adapter.method lora or "
            "dora): trainable expert shards are not supported by the FSDP2 Trainer's gradient "
            "clipping and sharded checkpoints yet"
        )


class ExpertParallelPlugin(Plugin):
    name = "expert_parallel"
    description = "MoE expert parallelism: experts split over processes, all-to-all, FSDP2 rest"
    config_cls = ExpertParallelConfig
    model_types = tuple(name for name, fam in FAMILIES.items() if fam.experts)
    # After the adapters (50), before fused_ops (100): a 4-bit model's expert stacks are then
    # quantized shard by shard, and the experts patch leaves the sharded forward in place.
    order = 90

    @classmethod
    def section_of(cls, cfg: Config) -> Any:
        raw = super().section_of(cfg)
        if raw is not None:
            check_config(cfg)
        return raw

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        from turbotune.distributed.env import init_distributed
        from turbotune.distributed.model import IGNORED_KEY
        from turbotune.moe.expert_parallel import expert_parameters, shard_experts

        _check_stacks(model)
        init_distributed("cpu" if getattr(training_args, "use_cpu", False) else "auto")
        self.patches = shard_experts(model, backend=self.config.backend, average_grads=True)
        model.__dict__[IGNORED_KEY] = expert_parameters(model)
        return model, training_args

    def describe(self) -> str:
        return f"experts split over the processes (all-to-all), kernels {self.config.backend}"


def _check_stacks(model: PreTrainedModel) -> None:
    from turbotune.moe.expert_parallel import experts_modules

    for module in experts_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            stack = module._parameters.get(name)
            if stack is None:
                raise ConfigError(
                    f"{type(module).__name__}.{name} is not a dense parameter (quantized or "
                    "adapted): expert parallelism splits dense expert stacks only"
                )
            if stack.is_meta:
                raise ConfigError("expert parallelism needs the loaded model, not a meta one")
