"""The FSDP plugin: shards the model with PyTorch FSDP2 (``distributed.enabled: true``).

It runs last (after adapters and fused-op patches, which must be in place before the blocks
are wrapped), owns the top-level ``distributed`` section, and needs no package beyond torch.
Loading (low-memory, 4-bit storage) and the Trainer side are done by ``turbotune train``
through :mod:`turbotune.distributed`; a script that keeps its own Trainer uses
``turbotune.distributed.FsdpTrainer`` (see ``docs`` in that package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from turbotune.distributed.config import DistributedConfig

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments

    from turbotune.config import Config


class FsdpPlugin(Plugin):
    name = "fsdp"
    description = "FSDP2 sharding (full/hybrid/no shard), 4-bit shardable storage, offload, DCP"
    config_cls = DistributedConfig
    section = "distributed"
    order = 200

    @classmethod
    def section_of(cls, cfg: Config) -> DistributedConfig | None:
        section = getattr(cfg, "distributed", None)
        return section if section is not None and section.enabled else None

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        from turbotune.distributed.model import plan_from_args, shard_model

        plan = plan_from_args(training_args)
        backend = "cpu" if getattr(training_args, "use_cpu", False) else "auto"
        seed = getattr(training_args, "seed", 42)
        return shard_model(model, self.config, plan, backend=backend, seed=seed), training_args

    def describe(self) -> str:
        from turbotune.distributed.model import describe

        return describe(self.config)
