"""Training data: loading, row formats, tokenization with response-only labels, collators.

Layout (one concern per module):

- :mod:`.sources`: local files (.json, .jsonl, .csv, .parquet, .txt), hub ids, shortcuts.
- :mod:`.formats`: which columns mean what; rows to prompt/target text; target checks.
- :mod:`.chat`: ``messages`` rows through the chat template, with exact assistant spans.
- :mod:`.tokenization`: text to ``input_ids``/``labels``, truncation, text chunks.
- :mod:`.build`: :func:`build_datasets`, the pipeline from ``DataConfig`` to datasets.
- :mod:`.collators`: :class:`PaddedCollator`, :func:`count_target_tokens`.

``datasets`` is imported only when data is loaded (it is slow to import).
"""

from __future__ import annotations

from turbotune.data.build import build_datasets
from turbotune.data.collators import PaddedCollator, count_target_tokens, resolve_pad_token_id
from turbotune.data.formats import FORMATS, resolve_format
from turbotune.data.sources import SHORTCUTS, load_source
from turbotune.data.tokenization import IGNORE_INDEX

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "SHORTCUTS",
    "PaddedCollator",
    "build_datasets",
    "count_target_tokens",
    "load_source",
    "resolve_format",
    "resolve_pad_token_id",
]
