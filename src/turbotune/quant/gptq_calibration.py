"""Token windows of real text: GPTQ's calibration batches, and the perplexity that judges it.

Design note. GPTQ only needs representative activations, so calibration is plain text cut into
fixed-length token windows (the GPTQ paper uses random 2048-token windows of C4). A file is read
as plain text (``.txt``), or as JSON / JSON lines records whose ``text`` field (or, failing
that, all string fields joined) is the text. The texts are tokenized, joined with the EOS token,
and windows are drawn at seeded random offsets. Held-out evaluation uses the same reader but
consecutive, non-overlapping windows, so a quality comparison (GPTQ vs round-to-nearest) scores
both models on exactly the same tokens.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from turbotune.errors import TurbotuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_batches", "perplexity", "read_texts", "token_stream", "windows"]


def _record_text(record: Any) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        return "\n".join(v for v in record.values() if isinstance(v, str) and v)
    return ""


def read_texts(path: str | Path) -> list[str]:
    """The texts of a ``.txt`` file (one text), a ``.json`` list or a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise TurbotuneError(f"calibration file '{path}' does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        records = json.loads(raw)
        records = records if isinstance(records, list) else [records]
    else:
        records = [raw]
    texts = [t for t in map(_record_text, records) if t.strip()]
    if not texts:
        raise TurbotuneError(f"calibration file '{path}' holds no text")
    return texts


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined by the EOS token (when the tokenizer has one): ``[n]``."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def windows(
    stream: torch.Tensor, n: int, seq_len: int, *, seed: int | None = 0
) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` tokens: at seeded random offsets, or consecutive ones from
    the start when ``seed`` is None (evaluation).

    Raises:
        TurbotuneError: the stream is shorter than one window (or than ``n`` consecutive ones).
    """
    if len(stream) < seq_len:
        raise TurbotuneError(f"{len(stream)} tokens of text, fewer than one {seq_len}-token window")
    if seed is None:
        if len(stream) < n * seq_len:
            raise TurbotuneError(f"{len(stream)} tokens cannot fill {n} windows of {seq_len}")
        return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seq_len) for _ in range(n)]
    return [stream[s : s + seq_len] for s in starts]


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    *,
    samples: int,
    seq_len: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``samples`` random windows of the file's text, as ``[batch_size, seq_len]`` id batches."""
    picked = windows(token_stream(tokenizer, read_texts(path)), samples, seq_len, seed=seed)
    return [torch.stack(picked[i : i + batch_size]) for i in range(0, samples, batch_size)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """``exp`` of the mean next-token loss over every predicted token of ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss.float().item()
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + loss * n, count + n
    return math.exp(total / count)
