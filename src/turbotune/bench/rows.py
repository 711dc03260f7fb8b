"""Real rows for the benchmark, read straight from a .json/.jsonl file (no ``datasets`` package).

The GPU machine has transformers (for the tokenizer) but not necessarily ``datasets``; a
benchmark only needs the rows' tokens, so this module reads the file with :mod:`json` and
tokenizes exactly as :func:`turbotune.data.build_datasets` does for the prompt/target formats
(``alpaca``; ``prompt_completion``, which covers GSM8K's question/answer): the same template,
BOS prefix, EOS suffix, truncation rule and response-only labels.

Paths under ``shared/data`` resolve wherever that folder is: as given, under
``$TURBOTUNE_SHARED_DATA``, ``./shared/data`` or ``../shared/data``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turbotune.errors import DataError

__all__ = ["read_rows", "resolve_shared_path", "tokenize_rows"]

_SHARED = "shared/data/"


def resolve_shared_path(path: str) -> Path:
    """``path`` itself if it exists, else the same file under another ``shared/data`` root."""
    given = Path(path).expanduser()
    if given.exists() or _SHARED not in given.as_posix():
        return given
    tail = given.as_posix().split(_SHARED, 1)[1]
    roots = [os.environ.get("TURBOTUNE_SHARED_DATA"), "shared/data", "../shared/data"]
    for root in filter(None, roots):
        candidate = Path(root) / tail
        if candidate.exists():
            return candidate
    return given


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON list file or a JSON-lines file.

    Raises:
        DataError: the file is missing, not JSON, or its rows are not objects.
    """
    path = resolve_shared_path(str(path))
    if not path.is_file():
        raise DataError(f"benchmark data file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects (rows)")
    return rows


def tokenize_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, list[int]]]:
    """``input_ids`` and response-only ``labels`` of prompt/target rows, as training builds them.

    Raises:
        DataError: the rows are not in a prompt/target format (``alpaca``, ``prompt_completion``).
    """
    from turbotune.data.formats import render_segments, resolve_format
    from turbotune.data.tokenization import encode_segments, make_labels, special_prefix, truncate

    fmt = resolve_format(list(rows[0]), source="benchmark data")
    if fmt.name not in ("alpaca", "prompt_completion"):
        raise DataError(f"the benchmark reads prompt/target rows; this file is '{fmt.name}'")
    prefix = special_prefix(tokenizer)
    encoded = encode_segments(
        tokenizer,
        [render_segments(fmt, row) for row in rows],
        prefix=prefix,
        eos_id=getattr(tokenizer, "eos_token_id", None),
    )
    out = []
    for example in encoded:
        example = truncate(example, max_length, keep_first=len(prefix))
        out.append({"input_ids": example.ids, "labels": make_labels(example, True)})
    return out
