"""Row formats: detection from real columns, templates, and the bad-row messages."""

from __future__ import annotations

import json

import pytest

from turbotune.data.formats import (
    QA_PROMPT,
    RowFormat,
    check_targets,
    render_segments,
    resolve_format,
)
from turbotune.errors import DataError


def _columns(path) -> list[str]:
    text = path.read_text()
    first = json.loads(text)[0] if path.suffix == ".json" else json.loads(text.splitlines()[0])
    return list(first)


def test_auto_detects_the_real_datasets(alpaca_tiny, gsm8k_train, c4_demo, chat_rows):
    # alpaca_tiny also has a 'text' column: the instruction format wins over plain text.
    assert resolve_format(_columns(alpaca_tiny)) == RowFormat("alpaca", "output", "instruction")
    assert resolve_format(_columns(gsm8k_train)) == RowFormat(
        "prompt_completion", "answer", "question"
    )
    assert resolve_format(_columns(c4_demo)) == RowFormat("text", "text")
    assert resolve_format(list(chat_rows[0])).name == "messages"
    assert resolve_format(["prompt", "completion"]).target_column == "completion"


def test_text_column_and_hint_choose_text(alpaca_tiny):
    columns = _columns(alpaca_tiny)
    assert resolve_format(columns, text_column="text").name == "text"
    assert resolve_format(["body"], text_column="body") == RowFormat("text", "body")
    assert resolve_format(["text"], hint="text").name == "text"
    # An explicit format beats the hint.
    assert resolve_format(columns, "alpaca", hint="text").name == "alpaca"


def test_alpaca_template_reproduces_the_datasets_own_text(alpaca_rows):
    """The dataset ships each row rendered in the Alpaca template: ours must match all 100."""
    fmt = RowFormat("alpaca", "output", "instruction")
    with_input = 0
    for i, row in enumerate(alpaca_rows):
        prompt, target = render_segments(fmt, row)
        assert not prompt.is_target and target.is_target
        assert prompt.text + target.text == row["text"], f"row {i}"
        with_input += bool(row["input"])
    assert 0 < with_input < len(alpaca_rows), "both template variants must be exercised"


def test_question_answer_templates():
    fmt = resolve_format(["question", "answer"])
    prompt, target = render_segments(fmt, {"question": "2+2?", "answer": 4})
    assert (prompt.text, target.text) == (QA_PROMPT.format(question="2+2?"), "4")
    fmt = resolve_format(["context", "question", "answer"])
    prompt, _ = render_segments(fmt, {"context": "CREATE TABLE t", "question": "q", "answer": "a"})
    assert prompt.text == "###Context:\nCREATE TABLE t\n###Question:\nq\n###Answer:\n"


def test_prompt_completion_is_joined_as_is():
    fmt = resolve_format(["prompt", "completion"])
    segments = render_segments(fmt, {"prompt": "Q: hi\nA:", "completion": " hello"})
    assert [(s.text, s.is_target) for s in segments] == [("Q: hi\nA:", False), (" hello", True)]


def test_no_format_fits_lists_found_and_needed_columns():
    with pytest.raises(DataError) as info:
        resolve_format(["query", "response"], source="mine.jsonl")
    message = str(info.value)
    assert "mine.jsonl: no format fits its columns ['query', 'response']" in message
    for need in ("alpaca: instruction + output", "prompt + completion", "question + answer"):
        assert need in message
    assert "messages: messages" in message and "text: text" in message


def test_requested_format_lacking_columns():
    with pytest.raises(DataError, match=r"x.csv: format 'alpaca' needs the columns instruction"):
        resolve_format(["instruction", "answer"], "alpaca", source="x.csv")
    with pytest.raises(DataError, match=r"unknown data\.format 'sharegpt'"):
        resolve_format(["text"], "sharegpt")


def test_empty_target_names_file_row_and_fix():
    fmt = RowFormat("alpaca", "output", "instruction")
    check_targets(fmt, ["a", "b"], "a.json")
    with pytest.raises(DataError) as info:
        check_targets(fmt, ["a", "  \n", None], "a.json")
    assert str(info.value) == (
        "a.json, row 1 (counting from 0): the 'output' is empty; remove the row or fill it"
    )


def test_message_rows_need_an_assistant_reply(chat_rows):
    fmt = RowFormat("messages", "messages")
    good = [row["messages"] for row in chat_rows[:5]]
    check_targets(fmt, good, "c.jsonl")
    user_only = [good[0][0]]
    with pytest.raises(DataError, match=r"c.jsonl, row 5 \(counting from 0\): .*no assistant turn"):
        check_targets(fmt, [*good, user_only], "c.jsonl")
    empty_reply = [good[0][0], {"role": "assistant", "content": ""}]
    with pytest.raises(DataError, match=r"row 2 .*assistant turn 1 has an empty 'content'"):
        check_targets(fmt, [good[0], good[1], empty_reply], "c.jsonl")
    with pytest.raises(DataError, match=r"row 0 .*needs 'role' and 'content'"):
        check_targets(fmt, [[{"from": "human", "value": "hi"}]], "c.jsonl")


def test_empty_text_rows_are_not_errors():
    check_targets(RowFormat("text", "text"), ["", "a"], "t.jsonl")
