"""``build_datasets``: from a :class:`~turbotune.config.DataConfig` to tokenized datasets.

Design: one pipeline, in this order, so that every choice is deterministic and every error
names its row: load rows (:mod:`.sources`) → first ``max_samples`` rows → resolve the format
(:mod:`.formats`) → check every target → hold out the eval rows (seeded, by whole rows, before
tokenization, so no text leaks across) → tokenize with ``datasets.map`` (its progress bar shows
on large sets). A .txt file is one document: it is tokenized first and its chunks are the rows.

``datasets.map`` runs with ``keep_in_memory=True`` and a fingerprint computed here: nothing is
written to the Hugging Face cache (a stale cached tokenization can never come back), and the
tokenizer is not pickled to hash it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from turbotune.data.chat import chat_segments, check_chat_template
from turbotune.data.formats import (
    RowFormat,
    as_text,
    check_targets,
    render_segments,
    resolve_format,
)
from turbotune.data.sources import Source, load_source
from turbotune.data.tokenization import (
    chunk,
    encode_documents,
    encode_segments,
    make_labels,
    special_prefix,
    truncate,
)
from turbotune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from turbotune.config import DataConfig

logger = logging.getLogger(__name__)

MAP_BATCH_SIZE = 256
"""Rows per ``datasets.map`` call (one batched tokenizer call each)."""


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[Dataset, Dataset | None]:
    """Load, check, split and tokenize the training data (and the evaluation data).

    Args:
        cfg: the ``data`` section.
        tokenizer: the model's Hugging Face tokenizer (a chat template is needed for the
            ``messages`` format).

    Returns:
        ``(train, eval)``: ``datasets.Dataset`` objects with the columns ``input_ids``,
        ``labels`` (unshifted; -100 where not trained on) and ``length`` (tokens per row, for
        length-grouped samplers); ``eval`` is ``None`` without ``eval_ratio`` or ``eval_path``.
        ``max_samples`` limits the training rows (the ``eval_ratio`` rows come out of them); an
        ``eval_path`` file is used whole, read like ``path`` (its own columns and format).
        ``add_eos`` applies to every format but ``messages``, whose template writes its own
        end-of-turn marker (part of each assistant target).

    Raises:
        DataError: missing file or columns, empty data, a row with an empty target, ...
        ConfigError: both ``eval_ratio`` and ``eval_path`` are set.
    """
    cfg.validate()
    if not cfg.path:
        raise DataError("data.path is empty: give a .json/.jsonl/.csv/.parquet/.txt file, a "
                        "Hugging Face dataset id, or a shortcut (alpaca, guanaco, ...)")  # fmt: skip
    if cfg.eval_path and cfg.eval_ratio > 0:
        raise ConfigError("give 'data.eval_ratio' or 'data.eval_path', not both")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ConfigError(f"'data.max_samples' must be at least 1, got {cfg.max_samples}")
    train, held_out = _build_one(cfg.path, cfg, tokenizer, max_samples=cfg.max_samples)
    if cfg.eval_path:
        held_out, _ = _build_one(cfg.eval_path, cfg, tokenizer, max_samples=None, hold_out=False)
    logger.info(
        "data: %d training examples%s from %s",
        len(train),
        f", {len(held_out)} evaluation examples" if held_out is not None else "",
        cfg.path,
    )
    return train, held_out


def _build_one(
    path: str, cfg: DataConfig, tokenizer: Any, *, max_samples: int | None, hold_out: bool = True
) -> tuple[Dataset, Dataset | None]:
    rows, source = load_source(path, cfg.split)
    _require_rows(rows, source)
    ratio = cfg.eval_ratio if hold_out else 0.0
    if source.contiguous:
        examples = _tokenize_stream(rows, tokenizer, cfg)
        if len(examples) == 0:
            raise DataError(f"{source.name} holds no text to train on")
        examples = _take(examples, max_samples)
        return _hold_out(examples, ratio, cfg.seed, source)
    rows = _take(rows, max_samples)
    fmt = resolve_format(
        rows.column_names,
        cfg.format,
        text_column=cfg.text_column,
        hint=source.format_hint,
        source=source.name,
    )
    if fmt.name == "messages":
        check_chat_template(tokenizer, source.name)
    check_targets(fmt, rows[fmt.target_column], source.name)
    train_rows, eval_rows = _hold_out(rows, ratio, cfg.seed, source)
    train = _tokenize_rows(train_rows, fmt, source, cfg, tokenizer)
    held_out = None
    if eval_rows is not None:
        held_out = _tokenize_rows(eval_rows, fmt, source, cfg, tokenizer)
    return train, held_out


def _require_rows(rows: Dataset, source: Source) -> None:
    if len(rows) == 0:
        raise DataError(f"{source.name} has no rows; check that it is the right file or split")


def _take(rows: Dataset, max_samples: int | None) -> Dataset:
    if max_samples is None or max_samples >= len(rows):
        return rows
    return rows.select(range(max_samples), keep_in_memory=True)


def _hold_out(
    rows: Dataset, ratio: float, seed: int, source: Source
) -> tuple[Dataset, Dataset | None]:
    """Seeded random split of whole rows: ``round(len * ratio)`` rows (at least one) for eval."""
    if ratio <= 0:
        return rows, None
    n_eval = max(1, round(len(rows) * ratio))
    if n_eval >= len(rows):
        raise DataError(
            f"{source.name}: {len(rows)} rows are too few to hold out data.eval_ratio={ratio}; "
            f"lower it or pass data.eval_path"
        )
    parts = rows.train_test_split(test_size=n_eval, shuffle=True, seed=seed, keep_in_memory=True)
    return parts["train"], parts["test"]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _tokenizer_key(tokenizer: Any) -> tuple[Any, ...]:
    template = getattr(tokenizer, "chat_template", None)
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            hashlib.sha256(repr(template).encode()).hexdigest())  # fmt: skip


def _tokenize_rows(
    rows: Dataset, fmt: RowFormat, source: Source, cfg: DataConfig, tokenizer: Any
) -> Dataset:
    if fmt.name == "text":
        encode, desc = _TextRows(fmt, tokenizer, cfg), "Tokenizing text"
    else:
        encode, desc = _InstructionRows(fmt, source, tokenizer, cfg), "Tokenizing"
    return rows.map(
        encode,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=True,
        new_fingerprint=_fingerprint(rows._fingerprint, fmt, cfg, _tokenizer_key(tokenizer)),
        desc=f"{desc} {source.name}",
    )


class _InstructionRows:
    """``datasets.map`` function of the formats with a prompt and a target."""

    def __init__(self, fmt: RowFormat, source: Source, tokenizer: Any, cfg: DataConfig):
        self.fmt, self.source, self.tokenizer, self.cfg = fmt, source, tokenizer, cfg
        self.response_only = cfg.response_only if cfg.response_only is not None else True
        chat = fmt.name == "messages"
        # A chat template writes its own BOS and end-of-turn markers.
        self.prefix = [] if chat else special_prefix(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if cfg.add_eos and not chat else None
        self.bos_id = getattr(tokenizer, "bos_token_id", None)

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        segments = [self._segments(batch, j, index) for j, index in enumerate(indices)]
        encoded = encode_segments(self.tokenizer, segments, prefix=self.prefix, eos_id=self.eos_id)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
        for example in encoded:
            keep = len(self.prefix) or int(bool(example.ids) and example.ids[0] == self.bos_id)
            example = truncate(example, self.cfg.max_length, keep_first=keep)
            out["input_ids"].append(example.ids)
            out["labels"].append(make_labels(example, self.response_only))
            out["length"].append(len(example.ids))
        return out

    def _segments(self, batch: dict[str, list[Any]], j: int, index: int) -> list[Any]:
        row = {key: values[j] for key, values in batch.items()}
        if self.fmt.name != "messages":
            return render_segments(self.fmt, row)
        try:
            return chat_segments(self.tokenizer, row["messages"])
        except DataError as err:
            raise DataError(f"{self.source.name}, row {index} (counting from 0): {err}") from err


class _TextRows:
    """``datasets.map`` function of plain-text rows: each row is a document cut into chunks."""

    def __init__(self, fmt: RowFormat, tokenizer: Any, cfg: DataConfig):
        self.column, self.tokenizer, self.cfg = fmt.target_column, tokenizer, cfg
        self.prefix = special_prefix(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None) if cfg.add_eos else None

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        texts = [as_text(value) for value in batch[self.column]]
        docs = encode_documents(self.tokenizer, texts, prefix=self.prefix, eos_id=self.eos_id)
        pieces = [piece for doc in docs for piece in chunk(doc, self.cfg.max_length)]
        return _text_columns(pieces)


def _text_columns(pieces: list[list[int]]) -> dict[str, list[Any]]:
    return {
        "input_ids": pieces,
        "labels": [list(p) for p in pieces],
        "length": [len(p) for p in pieces],
    }


def _tokenize_stream(rows: Dataset, tokenizer: Any, cfg: DataConfig) -> Dataset:
    """A .txt file's pieces as one token stream (BOS first, EOS last) cut into chunks."""
    from datasets import Dataset

    pieces = [as_text(t) for t in rows["text"]]
    if not any(piece.strip() for piece in pieces):
        return Dataset.from_dict(_text_columns([]))
    bodies = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    stream = list(special_prefix(tokenizer))
    for body in bodies:
        stream.extend(body)
    eos = getattr(tokenizer, "eos_token_id", None)
    if cfg.add_eos and eos is not None and len(stream) > 0:
        stream.append(eos)
    return Dataset.from_dict(_text_columns(chunk(stream, cfg.max_length)))
