"""The multipack plugin: micro-batches filled to a token budget, balanced over ranks.

It provides the training batch sampler (:class:`turbotune.data.multipack.MultipackBatchSampler`)
through the ``train_batch_sampler`` hook; the Trainer (:class:`turbotune.train.trainer.TurbotuneTrainer`)
builds the dataloader from it and tells it the epoch. A packed micro-batch is only worth it
without padding, so it needs the ``padding_free`` plugin (checked in ``augment``). With your own
Trainer: ``DataLoader(dataset, batch_sampler=fw.train_batch_sampler(dataset, args), ...)`` and
``sampler.set_epoch(epoch)`` at each epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turbotune.errors import ConfigError

from .base import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments

logger = logging.getLogger("turbotune")

VARLEN_IMPLEMENTATIONS = ("turbotune_varlen", "flash_attention_2", "flash_attention_3")


@dataclass
class MultipackConfig:
    max_tokens: int | None = None
    """Token budget of one micro-batch on one rank. ``None``: ``per_device_train_batch_size``
    times the longest training sample (the worst case of the padded batch it replaces)."""
    shuffle: bool = True
    """Draw a new order (and new members among equal lengths) every epoch."""


def dataset_lengths(dataset: Any) -> list[int]:
    """Tokens per sample: the ``length`` column when present, else ``len(input_ids)``."""
    names = getattr(dataset, "column_names", None) or []
    if "length" in names:
        return [int(n) for n in dataset["length"]]
    if "input_ids" in names:
        return [len(ids) for ids in dataset["input_ids"]]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


class MultipackPlugin(Plugin):
    name = "multipack"
    description = "multipack sampler: micro-batches by token budget, balanced across ranks"
    config_cls = MultipackConfig
    order = 95

    def augment(
        self, model: PreTrainedModel, training_args: TrainingArguments | None, peft_config: Any
    ) -> tuple[PreTrainedModel, TrainingArguments | None]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        implementation = getattr(base.config, "_attn_implementation", None)
        if implementation not in VARLEN_IMPLEMENTATIONS:
            raise ConfigError(
                "plugin 'multipack' packs several sequences per micro-batch and needs padding-free "
                f"attention, but the model uses '{implementation}': add 'plugins.padding_free'"
            )
        return model, training_args

    def train_batch_sampler(self, dataset: Any, training_args: TrainingArguments | None) -> Any:
        from turbotune.data.multipack import MultipackBatchSampler

        lengths = dataset_lengths(dataset)
        per_device = training_args.per_device_train_batch_size if training_args else 1
        budget = self.config.max_tokens or per_device * max(lengths)
        seed, world = 0, 1
        if training_args is not None:
            data_seed = training_args.data_seed
            seed = data_seed if data_seed is not None else training_args.seed
            world = training_args.world_size
        self.sampler = MultipackBatchSampler(
            lengths, budget, world_size=world, seed=seed, shuffle=self.config.shuffle
        )
        logger.info(
            "multipack: %d samples in %d micro-batches of at most %d tokens (%.1f%% filled), "
            "%d per rank per epoch",
            len(lengths), len(self.sampler), budget, 100 * self.sampler.efficiency(),
            len(self.sampler) // world,
        )  # fmt: skip
        return self.sampler

    def describe(self) -> str:
        budget = self.config.max_tokens
        return f"max_tokens: {budget if budget else 'batch size x longest sample'}"
