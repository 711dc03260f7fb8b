"""Chat rows: render ``messages`` with the tokenizer's chat template and find the assistant spans.

Design: a template is a black box, so the assistant spans are found by rendering prefixes of the
conversation. For assistant turn ``i``, the text of ``messages[:i]`` with the generation prompt
ends where the reply starts, and the text of ``messages[:i + 1]`` ends where the reply (with its
end-of-turn marker, which the model must learn to emit) ends. This needs no knowledge of the
template's markers and works for any template whose renderings of prefixes are prefixes of the
whole rendering (ChatML, Llama 2/3, Mistral, Gemma, Phi, ...). For a template that rewrites
earlier turns (some reasoning templates drop past thinking), it falls back to finding each reply's
content in the text, plus the end-of-sequence token when the template writes it right after.
"""

from __future__ import annotations

from typing import Any

from turbotune.data.formats import Segment, as_text
from turbotune.errors import DataError


def check_chat_template(tokenizer: Any, source: str) -> None:
    """Raise unless the tokenizer can render chats.

    Raises:
        DataError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{source}: the 'messages' format needs a tokenizer with a chat template, and the "
            f"tokenizer {name} has none; use a chat model's tokenizer (model.tokenizer) or "
            f"convert the rows to prompt/completion columns"
        )


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _clean(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turns without the ``None`` keys that Arrow adds when rows have different keys."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]]) -> list[Segment]:
    """The rendered conversation cut into pieces; assistant replies are the targets.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: the turns, each ``{"role": ..., "content": ...}``.

    Returns:
        Segments whose texts join to the full rendering; a target segment covers a reply and
        the template's end-of-turn text after it.
    """
    messages = _clean(messages)
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = _prefix_spans(tokenizer, messages, full)
    if spans is None:
        spans = _search_spans(tokenizer, messages, full)
    return _cut(full, spans)


def _prefix_spans(
    tokenizer: Any, messages: list[dict[str, Any]], full: str
) -> list[tuple[int, int]] | None:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        except Exception:  # a template that rejects a partial chat (e.g. one with no user turn)
            return None
        if not (full.startswith(upto) and upto.startswith(before)):
            return None
        if spans and len(before) < spans[-1][1]:
            return None
        spans.append((len(before), len(upto)))
    return spans


def _search_spans(
    tokenizer: Any, messages: list[dict[str, Any]], full: str
) -> list[tuple[int, int]]:
    eos = getattr(tokenizer, "eos_token", None) or ""
    spans, cursor = [], 0
    for turn, message in enumerate(messages):
        content = as_text(message.get("content"))
        start = full.find(content, cursor)
        if start < 0:
            if message["role"] == "assistant":
                raise DataError(
                    f"the chat template does not write assistant turn {turn} verbatim, so its "
                    f"tokens cannot be found; use format prompt_completion for these rows"
                )
            continue
        end = start + len(content)
        if message["role"] == "assistant":
            if eos and full.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
        cursor = end
    return spans


def _cut(full: str, spans: list[tuple[int, int]]) -> list[Segment]:
    segments, cursor = [], 0
    for start, end in spans:
        if start > cursor:
            segments.append(Segment(full[cursor:start], False))
        segments.append(Segment(full[start:end], True))
        cursor = end
    if cursor < len(full):
        segments.append(Segment(full[cursor:], False))
    return segments
