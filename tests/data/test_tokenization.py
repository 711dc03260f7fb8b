"""Tokenization: offsets mark exactly the target tokens; truncation never drops the target."""

from __future__ import annotations

import itertools

import pytest

from turbotune.data.formats import RowFormat, render_segments
from turbotune.data.tokenization import (
    IGNORE_INDEX,
    Encoded,
    chunk,
    encode_documents,
    encode_segments,
    make_labels,
    special_prefix,
    truncate,
)

ALPACA = RowFormat("alpaca", "output", "instruction")


def _target_ids(encoded: Encoded) -> list[int]:
    return [t for t, flag in zip(encoded.ids, encoded.target) if flag]


def test_special_prefix(stories_tokenizer, chat_tokenizer):
    assert special_prefix(stories_tokenizer) == [stories_tokenizer.bos_token_id]
    assert special_prefix(chat_tokenizer) == []  # SmolLM2 adds no BOS


def test_target_tokens_decode_to_the_output_lossless_tokenizer(chat_tokenizer, alpaca_rows):
    """Byte-level BPE is lossless: the target tokens decode to exactly output + EOS."""
    tok = chat_tokenizer
    rows = [render_segments(ALPACA, row) for row in alpaca_rows]
    encoded = encode_segments(tok, rows, eos_id=tok.eos_token_id)
    for i, (row, enc) in enumerate(zip(alpaca_rows, encoded)):
        assert tok.decode(_target_ids(enc)) == row["output"] + tok.eos_token, f"row {i}"
        prompt = [t for t, flag in zip(enc.ids, enc.target) if not flag]
        assert tok.decode(prompt) == rows[i][0].text, f"row {i}"
        # One contiguous target at the end: no prompt token after a target token.
        first = enc.target.index(True)
        assert all(enc.target[first:]), f"row {i}"


def test_joint_tokenization_with_bos(stories_tokenizer, alpaca_rows):
    """The ids are those of the whole text tokenized at once (what the model sees at inference),
    and the target tokens decode to the output (modulo the tokenizer's space collapsing)."""
    tok = stories_tokenizer
    rows = [render_segments(ALPACA, row) for row in alpaca_rows]
    encoded = encode_segments(tok, rows, prefix=[tok.bos_token_id], eos_id=tok.eos_token_id)
    for i, (segments, enc) in enumerate(zip(rows, encoded)):
        whole = tok(segments[0].text + segments[1].text)["input_ids"]
        assert enc.ids == [*whole, tok.eos_token_id], f"row {i}"
        assert not enc.target[0], "BOS is never a target"
        alone = tok.decode(tok(segments[1].text, add_special_tokens=False)["input_ids"])
        assert tok.decode(_target_ids(enc)) == alone + tok.eos_token, f"row {i}"


def test_slow_tokenizer_fallback_marks_the_same_tokens(stories_tokenizer, alpaca_rows, monkeypatch):
    tok = stories_tokenizer
    rows = [render_segments(ALPACA, row) for row in alpaca_rows[:40]]
    fast = encode_segments(tok, rows, eos_id=tok.eos_token_id)
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    slow = encode_segments(tok, rows, eos_id=tok.eos_token_id)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert tok.decode(_target_ids(a)) == tok.decode(_target_ids(b)), f"row {i}"


def test_eos_not_doubled(chat_tokenizer):
    eos = chat_tokenizer.eos_token
    [enc] = encode_segments(
        chat_tokenizer, [render_segments(ALPACA, {"instruction": "x", "output": "y" + eos})],
        eos_id=chat_tokenizer.eos_token_id,
    )  # fmt: skip
    assert enc.ids[-2:] != [chat_tokenizer.eos_token_id] * 2


def _example(n_prompt: int, n_target: int) -> Encoded:
    return Encoded(list(range(n_prompt + n_target)), [False] * n_prompt + [True] * n_target)


@pytest.mark.parametrize("keep_first", [0, 1])
def test_truncate_rule_on_a_grid(keep_first):
    for n_prompt, n_target, max_length in itertools.product(
        [1, 2, 5, 9, 16, 40], [1, 3, 8, 17, 50], [8, 9, 16, 33]
    ):
        case = f"P={n_prompt} T={n_target} L={max_length} keep={keep_first}"
        out = truncate(_example(n_prompt, n_target), max_length, keep_first=keep_first)
        if n_prompt + n_target <= max_length:
            assert out.ids == list(range(n_prompt + n_target)), case
            continue
        assert len(out.ids) == max_length, case
        kept_prompt = [t for t, f in zip(out.ids, out.target) if not f]
        kept_target = [t for t, f in zip(out.ids, out.target) if f]
        # Target: a head of the original target, at least min(T, L // 2) tokens.
        assert kept_target == list(range(n_prompt, n_prompt + len(kept_target))), case
        assert len(kept_target) >= min(n_target, max_length // 2), case
        # Prompt: the kept first tokens, then a tail of the prompt (cut from the left).
        first = min(keep_first, n_prompt)
        assert kept_prompt[:first] == list(range(first)), case
        tail = kept_prompt[first:]
        assert tail == list(range(n_prompt - len(tail), n_prompt)), case
        # The prompt is cut first: the target is whole when the prompt can give up enough.
        if n_target <= max_length - min(n_prompt, max_length - max_length // 2):
            assert len(kept_target) == n_target, case


def test_truncate_real_rows_keeps_the_output(chat_tokenizer, alpaca_rows):
    tok = chat_tokenizer
    rows = [render_segments(ALPACA, row) for row in alpaca_rows]
    for i, enc in enumerate(encode_segments(tok, rows, eos_id=tok.eos_token_id)):
        target = _target_ids(enc)
        out = truncate(enc, 64)
        assert len(out.ids) <= 64
        kept = _target_ids(out)
        assert kept == target[: len(kept)] and len(kept) >= min(len(target), 32), f"row {i}"


def test_make_labels():
    enc = Encoded([5, 6, 7, 8], [False, False, True, True])
    assert make_labels(enc, response_only=True) == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    assert make_labels(enc, response_only=False) == [5, 6, 7, 8]


def test_chunk_and_documents(stories_tokenizer, shakespeare):
    tok = stories_tokenizer
    text = shakespeare.read_text()[:3000]
    [doc, empty] = encode_documents(tok, [text, "  "], prefix=[1], eos_id=2)
    assert empty == []
    assert doc[0] == 1 and doc[-1] == 2
    assert doc[1:-1] == tok(text, add_special_tokens=False)["input_ids"]
    pieces = chunk(doc, 100)
    assert [t for p in pieces for t in p] == doc[: sum(map(len, pieces))]
    assert all(len(p) == 100 for p in pieces[:-1]) and len(pieces[-1]) >= 2
    assert chunk(list(range(201)), 100) == [list(range(100)), list(range(100, 200))]
