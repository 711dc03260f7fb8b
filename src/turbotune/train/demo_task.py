"""The built-in demo's synthetic task: 2-digit addition written least-significant digit first.

``"24+71="`` -> ``"950"`` means 42 + 17 = 059: both operands and the zero-padded sum are written
backwards. Little-endian numbers let a causal model emit each sum digit right after it can know
it (the two operand digits of that column and the carry it has just produced), the "reversed
output" trick of Lee et al. (2023), "Teaching Arithmetic to Small Transformers". Reversing the
operands as well puts the operand digits of column k at the same distance from the position that
predicts sum digit k for every k, which RoPE attention finds quickly: in our runs it made the
tiny model's escape from the initial loss plateau much more reliable across seeds than reversing
the sum alone. Fixed width keeps every prompt the same length, so batched greedy decoding needs no
care and the model's job is purely arithmetic.

Held-out examples are honest by construction: each operand pair ``(a, b)`` belongs to the train
or the eval split by a fixed hash, so no eval pair can appear in any training set, whatever the
seeds or sizes. The tokenizer is character level, built in code with the ``tokenizers`` library,
so the demo needs no download.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

DEMO_DIGITS = 2
"""Digits per operand of the demo task."""
EVAL_FRACTION = 10
"""One operand pair in this many belongs to the eval split."""
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARACTERS = "0123456789+="

Split = Literal["train", "eval"]


def build_demo_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, ``+`` and ``=``, built without any download.

    Encoding prepends ``<bos>`` (like Llama tokenizers); decoding joins characters without spaces.

    Args:
        save_dir: when given, the tokenizer is also written there with ``save_pretrained``.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Every character is its own word; special tokens are matched before pre-tokenization.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", vocab["<bos>"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",  # generation-ready; training collators pad on their own side
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _is_eval_pair(a: int, b: int, digits: int) -> bool:
    # A fixed multiplicative hash spreads the eval pairs over the whole operand range.
    return ((a * 10**digits + b) * 2654435761) % (1 << 32) % EVAL_FRACTION == 0


def _little_endian(value: int, width: int) -> str:
    return str(value).zfill(width)[::-1]


def demo_examples(
    n: int,
    seed: int,
    split: Split = "train",
    digits: int = DEMO_DIGITS,
    distinct: bool = False,
) -> list[dict[str, str]]:
    """``n`` random addition problems from one split (train and eval pairs never overlap).

    Args:
        n: number of examples.
        seed: seed of the draw.
        split: ``train`` or ``eval`` (about 1 pair in ``EVAL_FRACTION``), decided per operand pair
            by a fixed hash.
        digits: digits per operand.
        distinct: draw without replacement (``n`` must not exceed the pairs of the split);
            otherwise pairs may repeat.

    Returns:
        Dicts with ``prompt`` (``"24+71="``: 42 + 17, operands written backwards) and
        ``completion`` (``"950"``: the sum, zero-padded to ``digits + 1`` digits, backwards).
    """
    top = 10**digits
    want_eval = split == "eval"
    pairs = [
        (a, b) for a in range(top) for b in range(top) if _is_eval_pair(a, b, digits) == want_eval
    ]
    rng = random.Random(seed)
    if distinct:
        if n > len(pairs):
            raise ValueError(f"the {split} split has only {len(pairs)} distinct pairs, asked {n}")
        chosen = rng.sample(pairs, n)
    else:
        chosen = rng.choices(pairs, k=n)
    return [
        {
            "prompt": f"{_little_endian(a, digits)}+{_little_endian(b, digits)}=",
            "completion": _little_endian(a + b, digits + 1),
        }
        for a, b in chosen
    ]


def demo_readable(example: dict[str, str]) -> str:
    """An example in ordinary notation, for printing: ``{"24+71=", "950"}`` -> ``"42+17=59"``."""
    a, b = example["prompt"].rstrip("=").split("+")
    return f"{int(a[::-1])}+{int(b[::-1])}={int(example['completion'][::-1])}"


def tokenize_demo_example(
    example: dict[str, str], tokenizer: PreTrainedTokenizerFast
) -> dict[str, list[int]]:
    """``<bos> prompt completion <eos>`` ids, with labels -100 on ``<bos>`` and the prompt."""
    prompt = tokenizer(example["prompt"])["input_ids"]
    target = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    target = [*target, tokenizer.eos_token_id]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def demo_dataset(
    tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0, split: Split = "train"
):  # -> datasets.Dataset (imported lazily: datasets is slow to import)
    """A tokenized ``datasets.Dataset`` of the demo task with columns ``input_ids`` and ``labels``.

    The loss falls on the completion and ``<eos>`` only; every row has the same length.
    """
    from datasets import Dataset

    rows = [tokenize_demo_example(ex, tokenizer) for ex in demo_examples(n, seed, split)]
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    )


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded), cut at ``<eos>``.

    No KV cache: the demo's sequences are ~15 tokens, so recomputing is cheap and keeps the loop
    independent of the transformers cache API.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        # Left padding: positions count real tokens only, as they did in training.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        nxt = logits[:, -1].argmax(-1)  # (batch,)
        nxt = torch.where(done, tokenizer.pad_token_id, nxt)
        new_tokens.append(nxt)
        done |= nxt == tokenizer.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    gen = torch.stack(new_tokens, dim=1).tolist()  # (batch, steps)
    texts = []
    for row in gen:
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def demo_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[dict[str, str]],
    max_new_tokens: int = DEMO_DIGITS + 2,
    batch_size: int = 256,
) -> float:
    """Fraction of ``examples`` whose greedy completion (up to ``<eos>``) equals ``completion``.

    The model is put in eval mode for the measurement and restored afterwards.
    """
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            outs = greedy_generate(model, tokenizer, [ex["prompt"] for ex in batch], max_new_tokens)
            hits += sum(out == ex["completion"] for out, ex in zip(outs, batch))
    finally:
        model.train(was_training)
    return hits / max(len(examples), 1)
