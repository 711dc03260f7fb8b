"""build_datasets end to end on real data: labels, truncation, splits, and every bad-data error."""

from __future__ import annotations

import csv
import json

import pytest

from turbotune.config import DataConfig
from turbotune.data import IGNORE_INDEX, build_datasets
from turbotune.errors import ConfigError, DataError


def _label_text(tok, row) -> str:
    return tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def _masked_prefix(row) -> int:
    """Tokens before the first label: the response-only mask must cover exactly the prompt."""
    return next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)


def test_alpaca_response_only(chat_tokenizer, alpaca_tiny, alpaca_rows):
    tok = chat_tokenizer
    train, held_out = build_datasets(DataConfig(path=str(alpaca_tiny), max_length=2048), tok)
    assert held_out is None and len(train) == 100
    assert train.column_names == ["input_ids", "labels", "length"]
    for i, (row, source) in enumerate(zip(train, alpaca_rows)):
        assert _label_text(tok, row) == source["output"] + tok.eos_token, f"row {i}"
        start = _masked_prefix(row)
        # Masked tokens are exactly the prompt: the dataset's 'text' minus the output.
        assert tok.decode(row["input_ids"][:start]) == source["text"][: -len(source["output"])]
        assert all(t != IGNORE_INDEX for t in row["labels"][start:]), f"row {i}"
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])


def test_response_only_off_trains_on_everything(stories_tokenizer, alpaca_tiny):
    cfg = DataConfig(path=str(alpaca_tiny), response_only=False, max_samples=10)
    train, _ = build_datasets(cfg, stories_tokenizer)
    assert len(train) == 10
    assert all(row["labels"] == row["input_ids"] for row in train)


def test_truncation_keeps_the_target(stories_tokenizer, gsm8k_train):
    tok = stories_tokenizer
    cfg = DataConfig(path=str(gsm8k_train), max_length=64, max_samples=50)
    train, _ = build_datasets(cfg, tok)
    full, _ = build_datasets(DataConfig(path=str(gsm8k_train), max_samples=50), tok)
    truncated = 0
    for i, (short, long) in enumerate(zip(train, full)):
        assert short["length"] <= 64
        assert short["input_ids"][0] == tok.bos_token_id, "BOS survives the cut"
        kept = [t for t in short["labels"] if t != IGNORE_INDEX]
        target = [t for t in long["labels"] if t != IGNORE_INDEX]
        assert kept == target[: len(kept)], f"row {i}: the target's head is kept"
        assert len(kept) >= min(len(target), 32), f"row {i}"
        truncated += long["length"] > 64
    assert truncated > 25, "most GSM8K rows exceed 64 tokens: the rule must be exercised"


def test_messages_mask_only_assistant_turns(chat_tokenizer, messages_jsonl):
    tok = chat_tokenizer
    rows = [json.loads(line) for line in messages_jsonl.read_text().splitlines()]
    train, _ = build_datasets(DataConfig(path=str(messages_jsonl), max_length=1024), tok)
    assert len(train) == len(rows) == 40
    truncated = 0
    for i, (row, source) in enumerate(zip(train, rows)):
        messages = source["messages"]
        full = tok.apply_chat_template(messages, tokenize=False)
        replies = "".join(
            m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"
        )
        if len(tok(full)["input_ids"]) <= 1024:
            assert tok.decode(row["input_ids"]) == full, f"row {i}"
            assert _label_text(tok, row) == replies, f"row {i}"
        else:  # the reply tokens kept are the head of the replies
            truncated += 1
            assert row["length"] == 1024
            assert replies.startswith(_label_text(tok, row)), f"row {i}"
            assert len([t for t in row["labels"] if t != IGNORE_INDEX]) >= 512, f"row {i}"
    assert 0 < truncated < 40, "both whole and truncated conversations must be covered"


def test_text_rows_are_chunked(stories_tokenizer, c4_demo):
    tok = stories_tokenizer
    cfg = DataConfig(path=str(c4_demo), max_length=128, max_samples=20)
    train, _ = build_datasets(cfg, tok)
    assert len(train) > 20, "long C4 rows give several chunks"
    assert all(row["labels"] == row["input_ids"] for row in train)
    assert all(2 <= row["length"] <= 128 for row in train)
    # Rejoined chunks of the first document are its tokens + EOS.
    first_text = json.loads(c4_demo.read_text().splitlines()[0])["text"]
    doc = [tok.bos_token_id, *tok(first_text, add_special_tokens=False)["input_ids"], 2]
    n = -(-len(doc) // 128)
    assert [t for row in train.select(range(n)) for t in row["input_ids"]] == doc[: sum(
        train["length"][:n]
    )]  # fmt: skip


def test_txt_file_is_one_stream(stories_tokenizer, shakespeare, tmp_path):
    tok = stories_tokenizer
    text = shakespeare.read_text()[:20_000]
    path = tmp_path / "play.txt"
    path.write_text(text)
    train, held_out = build_datasets(
        DataConfig(path=str(path), max_length=256, eval_ratio=0.1), tok
    )
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], 2]
    n_chunks = len(ids) // 256 + (len(ids) % 256 >= 2)
    assert len(train) + len(held_out) == n_chunks
    assert len(held_out) == round(n_chunks * 0.1)
    chunks = {tuple(r["input_ids"]) for r in train} | {tuple(r["input_ids"]) for r in held_out}
    assert chunks == {tuple(ids[i : i + 256]) for i in range(0, n_chunks * 256, 256)}


def test_csv_parquet_json_give_the_same_examples(stories_tokenizer, alpaca_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in alpaca_rows[:30]]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    results = [
        build_datasets(DataConfig(path=str(tmp_path / name)), stories_tokenizer)[0].to_dict()
        for name in ("a.json", "a.csv", "a.parquet")
    ]
    assert results[0] == results[1] == results[2]


def test_eval_split_sizes_determinism_and_disjointness(stories_tokenizer, gsm8k_train):
    tok = stories_tokenizer
    cfg = DataConfig(path=str(gsm8k_train), max_samples=200, eval_ratio=0.15, max_length=64)
    train, held_out = build_datasets(cfg, tok)
    assert (len(train), len(held_out)) == (170, 30)
    again_train, again_eval = build_datasets(cfg, tok)
    assert again_train.to_dict() == train.to_dict() and again_eval.to_dict() == held_out.to_dict()
    train_ids = {tuple(r) for r in train["input_ids"]}
    assert not train_ids & {tuple(r) for r in held_out["input_ids"]}
    other = build_datasets(DataConfig(**{**cfg.__dict__, "seed": 7}), tok)[1]
    assert {tuple(r) for r in other["input_ids"]} != {tuple(r) for r in held_out["input_ids"]}


def test_eval_path(stories_tokenizer, alpaca_tiny, gsm8k_train, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(gsm8k_train.read_text().splitlines(keepends=True)[:50]))
    cfg = DataConfig(path=str(alpaca_tiny), eval_path=str(eval_file), max_samples=10)
    train, held_out = build_datasets(cfg, stories_tokenizer)
    assert len(train) == 10 and len(held_out) == 50  # max_samples limits training rows only
    # The eval file has its own format (question/answer): its labels are the answers.
    first = json.loads(eval_file.read_text().splitlines()[0])["answer"]
    assert stories_tokenizer.decode(
        [t for t in held_out[0]["labels"] if t != IGNORE_INDEX][:-1]
    ) == stories_tokenizer.decode(stories_tokenizer(first, add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError, match="not both"):
        build_datasets(DataConfig(path=str(alpaca_tiny), eval_path="x.json", eval_ratio=0.1), None)


def _write(tmp_path, name, rows) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_empty_output_row_error(stories_tokenizer, alpaca_rows, tmp_path):
    rows = [dict(r) for r in alpaca_rows[:8]]
    rows[5]["output"] = ""
    path = _write(tmp_path, "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(path=path), stories_tokenizer)
    assert str(info.value) == (
        f"{path}, row 5 (counting from 0): the 'output' is empty; remove the row or fill it"
    )


def test_missing_answer_and_missing_assistant_errors(chat_tokenizer, gsm8k_train, tmp_path):
    rows = [json.loads(line) for line in gsm8k_train.read_text().splitlines()[:4]]
    rows[2]["answer"] = None
    path = _write(tmp_path, "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"qa\.jsonl, row 2 \(counting from 0\): the 'answer'"):
        build_datasets(DataConfig(path=path), chat_tokenizer)
    chats = [{"messages": [{"role": "user", "content": r["question"]}]} for r in rows]
    path = _write(tmp_path, "chat.jsonl", chats)
    with pytest.raises(DataError, match=r"chat\.jsonl, row 0 .*no assistant turn"):
        build_datasets(DataConfig(path=path), chat_tokenizer)


def test_missing_columns_error(stories_tokenizer, tmp_path):
    path = _write(tmp_path, "odd.jsonl", [{"query": "a", "reply": "b"}])
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(path=path), stories_tokenizer)
    assert f"{path}: no format fits its columns ['query', 'reply']" in str(info.value)
    with pytest.raises(DataError, match=r"format 'messages' needs the columns messages"):
        build_datasets(DataConfig(path=path, format="messages"), stories_tokenizer)


def test_messages_need_a_chat_template(stories_tokenizer, messages_jsonl):
    with pytest.raises(DataError, match=r"chats\.jsonl: the 'messages' format needs a tokenizer"):
        build_datasets(DataConfig(path=str(messages_jsonl)), stories_tokenizer)


def test_empty_data_errors(stories_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        build_datasets(DataConfig(path=str(empty)), stories_tokenizer)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(DataError, match=r"blank\.txt holds no text to train on"):
        build_datasets(DataConfig(path=str(blank)), stories_tokenizer)
    with pytest.raises(DataError, match=r"data\.path is empty"):
        build_datasets(DataConfig(), stories_tokenizer)
    with pytest.raises(DataError, match="too few to hold out"):
        path = _write(tmp_path, "one.jsonl", [{"text": "one row only"}])
        build_datasets(DataConfig(path=path, eval_ratio=0.5), stories_tokenizer)
