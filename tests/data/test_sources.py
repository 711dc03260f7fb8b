"""Loading rows: every local file type gives back the same real rows; bad paths say what to do."""

from __future__ import annotations

import csv
import json

import pytest

from turbotune.data.sources import SHORTCUTS, load_source
from turbotune.errors import DataError

COLUMNS = ("instruction", "input", "output")


def _rows(dataset) -> list[dict]:
    return [{k: row[k] for k in COLUMNS} for row in dataset]


def _expected(alpaca_rows) -> list[dict]:
    return [{k: row[k] for k in COLUMNS} for row in alpaca_rows]


def test_json_list(alpaca_tiny, alpaca_rows):
    rows, source = load_source(str(alpaca_tiny))
    assert len(rows) == 100
    assert _rows(rows) == _expected(alpaca_rows)
    assert source.name == str(alpaca_tiny) and source.format_hint is None


def test_json_lines_in_json_and_jsonl(tmp_path, alpaca_rows, write_jsonl):
    for name in ("rows.json", "rows.jsonl"):
        path = write_jsonl(tmp_path / name, alpaca_rows[:30])
        rows, _ = load_source(str(path))
        assert _rows(rows) == _expected(alpaca_rows[:30]), name


def test_json_mapping_of_columns(tmp_path, alpaca_rows):
    columns = {k: [row[k] for row in alpaca_rows[:10]] for k in COLUMNS}
    path = tmp_path / "columns.json"
    path.write_text(json.dumps(columns))
    rows, _ = load_source(str(path))
    assert _rows(rows) == _expected(alpaca_rows[:10])


def test_csv_keeps_empty_cells_as_empty_strings(tmp_path, alpaca_rows):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_expected(alpaca_rows[:25]))
    rows, _ = load_source(str(path))
    assert _rows(rows) == _expected(alpaca_rows[:25])
    assert any(row["input"] == "" for row in rows)  # real rows without input


def test_parquet(tmp_path, alpaca_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(_expected(alpaca_rows[:25])), path)
    rows, _ = load_source(str(path))
    assert _rows(rows) == _expected(alpaca_rows[:25])


def test_txt_pieces_join_back_to_the_file(tmp_path, shakespeare, monkeypatch):
    from turbotune.data import sources

    text = shakespeare.read_text()[:50_000]
    path = tmp_path / "play.txt"
    path.write_text(text)
    monkeypatch.setattr(sources, "TXT_PIECE_CHARS", 4096)
    rows, source = load_source(str(path))
    pieces = rows["text"]
    assert len(pieces) > 5, "the file should be cut into several pieces"
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1]), "pieces end at line ends"
    assert source.contiguous and source.format_hint == "text"


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist.*check the path"):
        load_source(str(missing))
    with pytest.raises(DataError, match="does not exist"):
        load_source("./data/train")  # path-like, no extension


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>")
    with pytest.raises(DataError, match=r"unknown file type '\.xml'; supported: \.json"):
        load_source(str(path))


def test_bad_json_line_names_the_line(tmp_path, alpaca_rows, write_jsonl):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows[:3])
    path.write_text(path.read_text() + '{"instruction": "broken"\n')
    with pytest.raises(DataError, match=r"rows\.jsonl, line 4: not valid JSON"):
        load_source(str(path))


def test_json_rows_must_be_objects(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(
        DataError, match=r"rows\.json, row 1 \(counting from 0\): expected an object"
    ):
        load_source(str(path))


def test_plain_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a dataset saved with"):
        load_source(str(tmp_path))


def test_saved_dataset_directory(tmp_path, alpaca_rows):
    from datasets import Dataset

    Dataset.from_list(_expected(alpaca_rows[:5])).save_to_disk(str(tmp_path / "saved"))
    rows, _ = load_source(str(tmp_path / "saved"))
    assert _rows(rows) == _expected(alpaca_rows[:5])


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable right away (no retries): the offline switches of both libraries."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_dataset_says_what_to_do(offline):
    with pytest.raises(DataError) as info:
        load_source("turbotune-tests/not-cached-anywhere")
    assert str(info.value) == (
        "dataset turbotune-tests/not-cached-anywhere is not cached and the hub cannot be "
        "reached; download it on a machine with internet or pass a local file"
    )


def test_shortcuts_resolve_to_public_ids(offline):
    expected = {
        "alpaca": ("tatsu-lab/alpaca", "alpaca"),
        "alpaca-cleaned": ("yahma/alpaca-cleaned", "alpaca"),
        "guanaco": ("timdettmers/openassistant-guanaco", "text"),
        "orca-math": ("microsoft/orca-math-word-problems-200k", "prompt_completion"),
        "sql": ("knowrohit07/know_sql", "prompt_completion"),
    }
    assert {k: (v.hub_id, v.format) for k, v in SHORTCUTS.items()} == expected
    # Loading a shortcut really asks the hub for its id (offline here: the error names it).
    with pytest.raises(DataError, match="dataset timdettmers/openassistant-guanaco is not cached"):
        load_source("guanaco")
