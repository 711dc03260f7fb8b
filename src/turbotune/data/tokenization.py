"""Tokenization: rendered segments to ``input_ids`` and ``labels``, truncation, text chunks.

Design: a row's segments are joined and tokenized in one call, as the model will see the text at
inference, and each token is marked target or prompt by its character offsets (a token that
overlaps target text is a target token). Tokenizing the prompt and the target separately would
differ at the seam (SentencePiece adds a word-start marker to the target's first word). Slow
tokenizers have no offsets: they fall back to tokenizing each segment on its own.

Special tokens: the text is tokenized without them; the tokenizer's own prefix (a BOS, found by
:func:`special_prefix`) goes in front, and the EOS after the target when ``add_eos`` is on.
Chat renderings carry their own markers (the template writes them), so they get neither.

Truncation (:func:`truncate`): a row longer than ``max_length`` first loses prompt tokens from
the left (the BOS stays), but the prompt keeps at least ``max_length - max_length // 2`` tokens
(all of it when shorter); then the target's tail is cut. So the target always keeps at least
``min(len(target), max_length // 2)`` tokens and is never dropped whole. Text rows are not
truncated but cut into chunks of ``max_length`` (:func:`chunk`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from turbotune.data.formats import Segment

IGNORE_INDEX = -100
"""Label of a token that is not trained on (PyTorch cross-entropy's ``ignore_index``)."""


@dataclass
class Encoded:
    """One tokenized example before labels are made."""

    ids: list[int]
    """Token ids."""
    target: list[bool]
    """Per token: whether it belongs to a target (same length as ``ids``)."""


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of a text (e.g. ``[bos_id]``; often ``[]``)."""
    with_special = tokenizer("a")["input_ids"]
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(body) + 1):
        if with_special[start : start + len(body)] == body:
            return list(with_special[:start])
    return []


def encode_segments(
    tokenizer: Any,
    rows: Sequence[Sequence[Segment]],
    *,
    prefix: Sequence[int] = (),
    eos_id: int | None = None,
) -> list[Encoded]:
    """Tokenize rendered rows, marking target tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones give exact offsets).
        rows: per row, its segments in order.
        prefix: ids put in front of every row (the tokenizer's BOS); never targets.
        eos_id: appended to every row as a target token, unless the row already ends with it;
            ``None`` appends nothing.

    Returns:
        One :class:`Encoded` per row.
    """
    if getattr(tokenizer, "is_fast", False):
        bodies = _encode_by_offsets(tokenizer, rows)
    else:
        bodies = [_encode_piecewise(tokenizer, segments) for segments in rows]
    out = []
    for ids, target in bodies:
        ids, target = list(prefix) + ids, [False] * len(prefix) + target
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
            target.append(True)
        out.append(Encoded(ids, target))
    return out


def _encode_by_offsets(
    tokenizer: Any, rows: Sequence[Sequence[Segment]]
) -> list[tuple[list[int], list[bool]]]:
    texts = ["".join(s.text for s in segments) for segments in rows]
    # verbose=False: no "longer than model_max_length" warning; truncation is ours, later.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out = []
    for segments, text, ids, offsets in zip(rows, texts, enc["input_ids"], enc["offset_mapping"]):
        # covered[c] = number of target characters before character c.
        char_target = np.zeros(len(text) + 1, dtype=np.int64)
        cursor = 0
        for seg in segments:
            if seg.is_target:
                char_target[cursor + 1 : cursor + len(seg.text) + 1] = 1
            cursor += len(seg.text)
        covered = np.cumsum(char_target)
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        # A zero-width token takes the mark of the character it sits on.
        ends = np.minimum(np.maximum(spans[:, 1], spans[:, 0] + 1), len(text))
        starts = np.minimum(spans[:, 0], ends)
        flags = ((covered[ends] - covered[starts]) > 0).tolist()
        out.append((list(ids), flags))
    return out


def _encode_piecewise(tokenizer: Any, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    flags: list[bool] = []
    for seg in segments:
        if not seg.text:
            continue
        piece = tokenizer(seg.text, add_special_tokens=False, verbose=False)["input_ids"]
        ids += piece
        flags += [seg.is_target] * len(piece)
    return ids, flags


def truncate(encoded: Encoded, max_length: int, keep_first: int = 0) -> Encoded:
    """Fit an example into ``max_length`` tokens, never dropping the whole target.

    Everything before the first target token is the prompt; the rest is the target (for a chat,
    later user turns inside it stay unmarked). See the module docstring for the rule.

    Args:
        encoded: the example.
        max_length: the token budget (at least 2).
        keep_first: leading tokens that cutting the prompt from the left keeps (the BOS).
    """
    ids, target = encoded.ids, encoded.target
    if len(ids) <= max_length:
        return encoded
    boundary = target.index(True) if True in target else len(ids)
    keep_first = min(keep_first, boundary)
    n_prompt, n_target = boundary, len(ids) - boundary
    prompt_floor = min(n_prompt, max_length - max_length // 2)
    n_target_kept = min(n_target, max_length - prompt_floor)
    n_prompt_kept = max(min(n_prompt, max_length - n_target_kept), keep_first)
    cut_from = boundary - (n_prompt_kept - keep_first)
    index = list(range(keep_first)) + list(range(cut_from, boundary + n_target_kept))
    return Encoded([ids[i] for i in index], [target[i] for i in index])


def make_labels(encoded: Encoded, response_only: bool) -> list[int]:
    """Labels aligned with ``input_ids`` (not shifted): ``-100`` where not trained on."""
    if not response_only:
        return list(encoded.ids)
    return [t if is_target else IGNORE_INDEX for t, is_target in zip(encoded.ids, encoded.target)]


def chunk(ids: Sequence[int], max_length: int, min_length: int = 2) -> list[list[int]]:
    """Cut a token stream into pieces of ``max_length``; a last piece shorter than
    ``min_length`` is dropped (one token has nothing to predict)."""
    pieces = [list(ids[i : i + max_length]) for i in range(0, len(ids), max_length)]
    return [p for p in pieces if len(p) >= min_length]


def encode_documents(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prefix: Sequence[int] = (),
    eos_id: int | None = None,
) -> list[list[int]]:
    """Tokenize plain-text documents: ``prefix + tokens + [eos]`` each; empty texts give ``[]``."""
    bodies = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for text, body in zip(texts, bodies):
        if not text.strip():
            out.append([])
            continue
        ids = list(prefix) + list(body)
        if eos_id is not None and ids[-1] != eos_id:
            ids.append(eos_id)
        out.append(ids)
    return out
