"""Row formats: which columns mean what, and how a row becomes prompt text and target text.

Design: a row is rendered into :class:`Segment` pieces of text, each marked as target or not;
tokenization (see :mod:`turbotune.data.tokenization`) turns the joined text into tokens and
carries the marks over by character offsets. Keeping rendering in text makes every format
testable without a tokenizer and lets the prompt/target boundary be exact.

Formats (``data.format``; ``auto`` picks the first that fits the columns, in this order):

- ``messages``: a ``messages`` column of ``{role, content}`` turns, rendered with the
  tokenizer's chat template (see :mod:`turbotune.data.chat`); targets are the assistant turns.
- ``alpaca``: ``instruction``, ``output`` and optional ``input``, in the Stanford Alpaca prompt
  template (the exact text of the dataset's own ``text`` column).
- ``prompt_completion``: ``prompt`` + ``completion`` joined as they are (TRL's convention), or
  ``question`` + ``answer`` (GSM8K, orca-math; optional ``context`` as in know_sql) in the
  ``###Question:`` template that fsdp_qlora uses.
- ``text``: a ``text`` column (or ``data.text_column``), or a .txt file; every token is a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turbotune.errors import DataError

FORMATS = ("messages", "alpaca", "prompt_completion", "text")
"""Format names, in the order ``auto`` tries them."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
QA_PROMPT = "###Question:\n{question}\n###Answer:\n"
QA_PROMPT_WITH_CONTEXT = "###Context:\n{context}\n###Question:\n{question}\n###Answer:\n"

FORMAT_NEEDS = {
    "messages": "messages (a list of {role, content} turns)",
    "alpaca": "instruction + output (input optional)",
    "prompt_completion": "prompt + completion, or question + answer (context optional)",
    "text": "text (or the column named by data.text_column)",
}


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered row."""

    text: str
    is_target: bool
    """Whether the tokens of this text are trained on when ``response_only`` is on."""


@dataclass(frozen=True)
class RowFormat:
    """A format resolved against a dataset's columns."""

    name: str
    """One of :data:`FORMATS`."""
    target_column: str
    """The column holding the target: output, completion, answer, messages or the text column."""
    prompt_column: str | None = None
    """The prompt column: instruction, prompt or question (``None`` for messages and text)."""

    @property
    def instruction_like(self) -> bool:
        """Whether the format separates a prompt from a target (response-only loss applies)."""
        return self.name != "text"


def _candidates(columns: set[str], text_column: str | None) -> dict[str, RowFormat | None]:
    text_col = text_column or "text"
    return {
        "messages": RowFormat("messages", "messages") if "messages" in columns else None,
        "alpaca": RowFormat("alpaca", "output", "instruction")
        if {"instruction", "output"} <= columns
        else None,
        "prompt_completion": RowFormat("prompt_completion", "completion", "prompt")
        if {"prompt", "completion"} <= columns
        else RowFormat("prompt_completion", "answer", "question")
        if {"question", "answer"} <= columns
        else None,
        "text": RowFormat("text", text_col) if text_col in columns else None,
    }


def resolve_format(
    columns: Sequence[str],
    requested: str = "auto",
    *,
    text_column: str | None = None,
    hint: str | None = None,
    source: str = "the dataset",
) -> RowFormat:
    """Pick the row format for a dataset's columns.

    Args:
        columns: the dataset's column names.
        requested: ``data.format``; ``auto`` detects (a given ``text_column`` means ``text``).
        text_column: ``data.text_column``.
        hint: a format the source implies (a shortcut, a .txt file), used when ``auto``.
        source: file or dataset name for error messages.

    Raises:
        DataError: no format fits, or the requested one lacks its columns.
    """
    found = set(columns)
    options = _candidates(found, text_column)
    if requested == "auto":
        requested = hint or ("text" if text_column else "auto")
    if requested == "auto":
        for name in FORMATS:
            if options[name] is not None:
                return options[name]
        needs = "; ".join(f"{name}: {need}" for name, need in FORMAT_NEEDS.items())
        raise DataError(
            f"{source}: no format fits its columns {sorted(found)}. Formats need: {needs}. "
            f"Rename the columns or set data.format (and data.text_column)"
        )
    if requested not in options:
        raise DataError(f"unknown data.format {requested!r}; valid: auto, {', '.join(FORMATS)}")
    fmt = options[requested]
    if fmt is None:
        raise DataError(
            f"{source}: format '{requested}' needs the columns {FORMAT_NEEDS[requested]}; "
            f"found {sorted(found)}"
        )
    return fmt


def as_text(value: Any) -> str:
    """A cell as text: ``None`` is empty, numbers are written out."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def render_segments(fmt: RowFormat, row: dict[str, Any]) -> list[Segment]:
    """Prompt and target text of an ``alpaca`` or ``prompt_completion`` row.

    Raises:
        ValueError: for ``messages`` and ``text``, which are rendered elsewhere.
    """
    target = as_text(row[fmt.target_column])
    if fmt.name == "alpaca":
        fields = {"instruction": as_text(row["instruction"]), "input": as_text(row.get("input"))}
        template = ALPACA_PROMPT_WITH_INPUT if fields["input"].strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(**fields)
    elif fmt.name == "prompt_completion" and fmt.prompt_column == "question":
        context = as_text(row.get("context"))
        template = QA_PROMPT_WITH_CONTEXT if context.strip() else QA_PROMPT
        prompt = template.format(question=as_text(row["question"]), context=context)
    elif fmt.name == "prompt_completion":
        prompt = as_text(row["prompt"])
    else:
        raise ValueError(f"format {fmt.name!r} is not rendered from prompt and target columns")
    return [Segment(prompt, False), Segment(target, True)]


def check_targets(fmt: RowFormat, column: Sequence[Any], source: str) -> None:
    """Raise on the first row whose target is empty (text rows may be empty: they are skipped).

    Args:
        fmt: the resolved format.
        column: the dataset's ``fmt.target_column`` values, in row order.
        source: file or dataset name for the message.

    Raises:
        DataError: naming the file, the row (counting from 0) and the fix.
    """
    if fmt.name == "text":
        return
    check = _message_problem if fmt.name == "messages" else _empty_problem
    for index, value in enumerate(column):
        problem = check(fmt, value)
        if problem:
            raise DataError(f"{source}, row {index} (counting from 0): {problem}")


def _empty_problem(fmt: RowFormat, value: Any) -> str | None:
    if as_text(value).strip():
        return None
    return f"the '{fmt.target_column}' is empty; remove the row or fill it"


def _message_problem(fmt: RowFormat, messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} turns"
    has_reply = False
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"turn {turn} of 'messages' needs 'role' and 'content' keys; got {message!r}"
        if message["role"] == "assistant":
            if not as_text(message["content"]).strip():
                return f"assistant turn {turn} has an empty 'content'; remove the row or fill it"
            has_reply = True
    if not has_reply:
        return "'messages' has no assistant turn to train on; remove the row or add the reply"
    return None
