"""One rank of the data-parallel multipack test (``torchrun --nproc-per-node N`` this file OUT).

Trains a tiny Llama for one epoch with the real Trainer, the padding-free collator and the
multipack sampler, on rows whose first token is the row's index; every rank writes the rows of
each of its micro-batches (and their tokens) to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROWS = 48
VOCAB = 128


class RecordingCollator:
    """The padding-free collator that also notes which rows (by first token) each batch holds."""

    def __init__(self):
        from turbotune.data.padding_free import PaddingFreeCollator

        self.inner = PaddingFreeCollator()
        self.seen: list[dict] = []

    def __call__(self, features):
        self.seen.append(
            {"rows": [int(f["input_ids"][0]) for f in features],
             "tokens": sum(len(f["input_ids"]) for f in features)}
        )  # fmt: skip
        return self.inner(features)


def dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 60, (ROWS,), generator=g).tolist()
    rows = [
        {"input_ids": [i, *torch.randint(0, VOCAB, (n - 1,), generator=g).tolist()], "length": n}
        for i, n in enumerate(lengths)
    ]
    return Dataset.from_list(rows)


def main(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    from turbotune.attention import use_varlen_attention
    from turbotune.config import TrainConfig
    from turbotune.data.multipack import MultipackBatchSampler
    from turbotune.train.trainer import TurbotuneTrainer

    torch.set_num_threads(1)
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    use_varlen_attention(model)
    args = TrainingArguments(
        output_dir=str(out / "run"), num_train_epochs=1, per_device_train_batch_size=1,
        learning_rate=1e-3, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        logging_steps=1, remove_unused_columns=False, seed=3, data_seed=3,
    )  # fmt: skip
    collator = RecordingCollator()
    train = dataset()

    def sampler(ds):
        return MultipackBatchSampler(ds["length"], 200, world_size=args.world_size, seed=3)

    trainer = TurbotuneTrainer(
        model=model, args=args, train_dataset=train, data_collator=collator,
        train_config=TrainConfig(lr_scheduler="constant"), train_batch_sampler=sampler,
    )  # fmt: skip
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    expected = trainer.train_batch_sampler().rank_batches(rank, epoch=0)
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {"seen": collator.seen, "expected": expected, "steps": trainer.state.global_step}
        )
    )
    # Tear gloo down before the interpreter does: a process group left to the exit handlers
    # sometimes aborts ("terminate called without an active exception") after the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
