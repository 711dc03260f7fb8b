"""Fixtures of the data tests: real tokenizers and real rows from the shared data folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def stories_tokenizer(shared_data: Path):
    """stories260K's fast SentencePiece tokenizer: adds BOS, has no chat template, no pad."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_need(shared_data / "stories260K" / "hf"))


@pytest.fixture(scope="session")
def chat_tokenizer(shared_data: Path):
    """SmolLM2-135M-Instruct's byte-BPE tokenizer with its ChatML chat template."""
    from transformers import AutoTokenizer

    path = _need(shared_data / "smollm2-135m-instruct" / "hf-tokenizer-config")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def alpaca_tiny(shared_data: Path) -> Path:
    """100 real Stanford Alpaca rows (instruction/input/output/text)."""
    return _need(shared_data / "alpaca" / "alpaca_tiny.json")


@pytest.fixture(scope="session")
def alpaca_rows(alpaca_tiny: Path) -> list[dict[str, Any]]:
    return json.loads(alpaca_tiny.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def gsm8k_train(shared_data: Path) -> Path:
    """GSM8K train (question/answer), 7473 rows."""
    return _need(shared_data / "gsm8k" / "train.jsonl")


@pytest.fixture(scope="session")
def c4_demo(shared_data: Path) -> Path:
    """300 real C4 ``text`` rows."""
    return _need(shared_data / "llamafactory-demo" / "c4_demo.jsonl")


@pytest.fixture(scope="session")
def shakespeare(shared_data: Path) -> Path:
    return _need(shared_data / "tiny-shakespeare" / "tiny_shakespeare.txt")


@pytest.fixture(scope="session")
def chat_rows(shared_data: Path) -> list[dict[str, Any]]:
    """Real single- and multi-turn conversations (LLaMA-Factory's KTO demo, ``label`` dropped)."""
    path = _need(shared_data / "llamafactory-demo" / "kto_en_demo.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"messages": row["messages"]} for row in rows]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, rows) -> path``: rows as JSON lines."""
    return _write_jsonl


@pytest.fixture
def messages_jsonl(tmp_path: Path, chat_rows: list[dict[str, Any]]) -> Path:
    """A messages JSONL of 40 real conversations, multi-turn ones included."""
    multi = [r for r in chat_rows if len(r["messages"]) > 2][:20]
    single = [r for r in chat_rows if len(r["messages"]) == 2][:20]
    return _write_jsonl(tmp_path / "chats.jsonl", multi + single)
