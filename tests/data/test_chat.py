"""Chat rows: assistant spans found by prefix rendering match the ChatML layout exactly."""

from __future__ import annotations

import pytest

from turbotune.data.chat import _prefix_spans, chat_segments, check_chat_template
from turbotune.errors import DataError

# Prefix renderings are not prefixes of the whole: the first line counts the turns.
COUNTING_TEMPLATE = (
    "{{ messages|length }} turns\n{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _replies(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_spans_are_the_replies_with_their_end_of_turn(chat_tokenizer, chat_rows):
    multi_turn = 0
    for i, row in enumerate(chat_rows[:60]):
        messages = row["messages"]
        segments = chat_segments(chat_tokenizer, messages)
        full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
        assert "".join(s.text for s in segments) == full, f"row {i}"
        targets = [s.text for s in segments if s.is_target]
        assert targets == [reply + "<|im_end|>\n" for reply in _replies(messages)], f"row {i}"
        # Everything else is prompt: the system prompt, user turns, "<|im_start|>assistant\n".
        prompts = [s.text for s in segments if not s.is_target]
        assert all(p.endswith("<|im_start|>assistant\n") for p in prompts), f"row {i}"
        multi_turn += len(targets) > 1
    assert multi_turn >= 5, "multi-turn conversations must be covered"


def test_fallback_when_prefixes_are_not_stable(chat_tokenizer, chat_rows, monkeypatch):
    monkeypatch.setattr(chat_tokenizer, "chat_template", COUNTING_TEMPLATE)
    messages = next(r["messages"] for r in chat_rows if len(r["messages"]) >= 4)
    full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    assert _prefix_spans(chat_tokenizer, messages, full) is None
    segments = chat_segments(chat_tokenizer, messages)
    assert "".join(s.text for s in segments) == full
    # The fallback finds each reply and the EOS (<|im_end|>) the template writes after it.
    targets = [s.text for s in segments if s.is_target]
    assert targets == [reply + "<|im_end|>" for reply in _replies(messages)]


def test_template_that_rewrites_replies_is_an_error(chat_tokenizer, chat_rows, monkeypatch):
    rewriting = COUNTING_TEMPLATE.replace("m['content']", "m['content']|upper")
    monkeypatch.setattr(chat_tokenizer, "chat_template", rewriting)
    with pytest.raises(DataError, match="does not write assistant turn 1 verbatim"):
        chat_segments(chat_tokenizer, chat_rows[0]["messages"])


def test_tokenizer_without_chat_template(stories_tokenizer):
    with pytest.raises(DataError, match=r"c.jsonl: the 'messages' format needs a tokenizer with"):
        check_chat_template(stories_tokenizer, "c.jsonl")
