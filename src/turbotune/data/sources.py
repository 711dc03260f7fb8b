"""Where rows come from: local files, Hugging Face hub datasets, and named shortcuts.

Design: every source becomes an in-memory ``datasets.Dataset`` of raw rows plus a
:class:`Source` record (a display name for error messages, a format hint, and whether the rows
are consecutive pieces of one document). Local files are parsed here with the standard library
and pyarrow rather than through ``datasets.load_dataset("json", ...)``: that keeps error
messages precise (file name and line), writes nothing into the Hugging Face cache, and is fast
for the file sizes people fine-tune on.

Resolution order of ``data.path``: an existing local path; else a shortcut name
(:data:`SHORTCUTS`); else a path-looking string with a data-file extension (a missing file);
else a hub id, optionally ``owner/name:config`` to pick a dataset configuration (hub ids cannot
contain ``:``). Hub loading goes through ``datasets.load_dataset``; when the hub cannot be
reached and the dataset is not cached, the error says so and what to do.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turbotune.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
"""Extensions of the local files turbotune reads."""

TXT_PIECE_CHARS = 1 << 20
"""A .txt file is cut at line ends into pieces of about this many characters (tokenized one by
one, then joined again): bounded memory per tokenizer call."""


@dataclass(frozen=True)
class Shortcut:
    """A short name for a public dataset used by the reference benchmarks."""

    hub_id: str
    """Hugging Face dataset id."""
    format: str
    """The format its rows are in (see :mod:`turbotune.data.formats`)."""
    split: str = "train"
    """The split to train on when ``data.split`` is left at its default ``train``."""


SHORTCUTS: dict[str, Shortcut] = {
    "alpaca": Shortcut("tatsu-lab/alpaca", "alpaca"),
    "alpaca-cleaned": Shortcut("yahma/alpaca-cleaned", "alpaca"),
    # Guanaco rows are "### Human: ... ### Assistant: ..." text: trained on as plain text.
    "guanaco": Shortcut("timdettmers/openassistant-guanaco", "text"),
    # question/answer columns, like GSM8K.
    "orca-math": Shortcut("microsoft/orca-math-word-problems-200k", "prompt_completion"),
    # context/question/answer columns; the dataset only has a validation split (as fsdp_qlora uses).
    "sql": Shortcut("knowrohit07/know_sql", "prompt_completion", split="validation"),
}


@dataclass(frozen=True)
class Source:
    """What was loaded, for the later steps and their error messages."""

    name: str
    """The file path or hub id, as shown in error messages."""
    format_hint: str | None = None
    """The format a shortcut or a .txt file implies; ``None``: detect from the columns."""
    contiguous: bool = False
    """Rows are consecutive pieces of one document (a .txt file): tokenize them as one stream."""


def load_source(path: str, split: str = "train") -> tuple[Dataset, Source]:
    """Load the raw rows named by ``path`` (a file, a directory, a shortcut or a hub id).

    Args:
        path: the ``data.path`` value.
        split: the split of a hub dataset (a shortcut's own split replaces the default ``train``).

    Returns:
        ``(rows, source)``: an in-memory dataset of raw rows and its description.

    Raises:
        DataError: the file is missing, unreadable or of an unknown type, the hub cannot be
            reached, or the split does not exist.
    """
    local = Path(path).expanduser()
    if local.exists():
        return _load_local(local), _local_source(local)
    if path in SHORTCUTS:
        short = SHORTCUTS[path]
        rows = load_hub(short.hub_id, short.split if split == "train" else split)
        return rows, Source(short.hub_id, format_hint=short.format)
    if _looks_like_file(path):
        raise DataError(
            f"data file {path} does not exist (working directory: {os.getcwd()}); check the path"
        )
    return load_hub(path, split), Source(path)


def _looks_like_file(path: str) -> bool:
    lowered = path.lower()
    return (
        lowered.endswith(FILE_TYPES)
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1  # hub ids have exactly one
    )


def _local_source(path: Path) -> Source:
    if path.suffix.lower() == ".txt":
        return Source(str(path), format_hint="text", contiguous=True)
    return Source(str(path))


def _load_local(path: Path) -> Dataset:
    from datasets import Dataset, load_from_disk

    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return load_from_disk(str(path))
        raise DataError(
            f"{path} is a directory but not a dataset saved with `Dataset.save_to_disk`; "
            f"pass one data file ({', '.join(FILE_TYPES)})"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        return Dataset.from_list(_read_json(path))
    if suffix == ".jsonl":
        return Dataset.from_list(_read_json_lines(path, path.read_text(encoding="utf-8")))
    if suffix == ".csv":
        return Dataset.from_list(_read_csv(path))
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".txt":
        return Dataset.from_dict({"text": _read_txt_pieces(path)})
    raise DataError(f"{path}: unknown file type '{suffix}'; supported: {', '.join(FILE_TYPES)}")


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of rows, a mapping of equal-length columns, or JSON lines in a .json file."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines
            return _read_json_lines(path, text)
        raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from err
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:
            return [dict(zip(data, values)) for values in zip(*data.values())]
    if isinstance(data, dict):
        return [data]  # one row (JSON lines with a single line)
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of rows, got a {type(data).__name__}")
    return _check_rows(path, data)


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {line_no}: not valid JSON ({err.msg}); fix or remove the line"
            ) from err
    return _check_rows(path, rows)


def _check_rows(path: Path, rows: list[Any]) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, row {i} (counting from 0): expected an object with named fields, "
                f"got a {type(row).__name__}"
            )
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    # The csv module keeps every cell a string: an empty cell is "" (pandas would make it NaN).
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_parquet(path: Path) -> Dataset:
    import pyarrow.parquet as pq
    from datasets import Dataset

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a readable Parquet file: {err}") from err
    return Dataset(table)


def _read_txt_pieces(path: Path) -> list[str]:
    """The file cut at line ends into pieces of about :data:`TXT_PIECE_CHARS` characters."""
    text = path.read_text(encoding="utf-8")
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TXT_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def load_hub(name: str, split: str) -> Dataset:
    """Load one split of a hub dataset (``owner/name`` or ``owner/name:config``).

    Raises:
        DataError: offline and not cached, unknown dataset, or unknown split.
    """
    import datasets

    hub_id, _, config = name.partition(":")
    try:
        return datasets.load_dataset(hub_id, config or None, split=split)
    except Exception as err:
        if _is_connection_failure(err):
            raise DataError(
                f"dataset {hub_id} is not cached and the hub cannot be reached; download it on a "
                f"machine with internet or pass a local file"
            ) from err
        if type(err).__name__ in {"DatasetNotFoundError", "FileNotFoundError"}:
            raise DataError(
                f"dataset {hub_id} was not found on the hub nor as a local file; "
                f"check the name, or pass a .json/.jsonl/.csv/.parquet/.txt file"
            ) from err
        if isinstance(err, ValueError) and "split" in str(err).lower():
            raise DataError(f"dataset {hub_id}: {err}; set data.split") from err
        if isinstance(err, ValueError) and "config" in str(err).lower():
            raise DataError(
                f"dataset {hub_id}: {err}; name the configuration as {hub_id}:CONFIG"
            ) from err
        raise


_CONNECTION_ERRORS = {
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
}


def _is_connection_failure(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception it came from means "the hub cannot be reached"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if any(cls.__name__ in _CONNECTION_ERRORS for cls in type(err).__mro__):
            return True
        if type(err).__name__ == "ConnectionError":  # requests' own, not the builtin
            return True
        err = err.__cause__ or err.__context__
    return False
