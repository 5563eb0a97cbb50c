"""Chat messages checked and their content made text: a string, or OpenAI-style parts.

vLLM's LLM.chat and the OpenAI API take a message's content as a string or as a list of parts
({"type": "text", "text": ...}); datasets in that format store every content as parts. For a
template that renders text (the models llmbatch runs take no images), vLLM joins the text parts
with "\\n"; so do we, and a part that is not text is the row's error. As vLLM's chat_utils:
a part that is a plain string is text; the OpenAI Responses API's input_text / output_text
parts and a refusal part are text too; a text part whose text is null is skipped; a content
of null (an assistant message beside its tool_calls) or [] is "". A Parquet struct column
gives every part all the fields any part has (None where a part lacks one): only `type`,
`text` and `refusal` are read.
"""

from __future__ import annotations

from typing import Any, Optional


# Part type -> the field holding its text (vLLM's MM_PARSER_MAP, text entries).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


def _as_mapping(value: Any) -> Any:
    """A map-typed Arrow value (Spark writes Python dicts as MapType) reads as a list of (key,
    value) pairs: as a dict. Anything else as it is."""
    if isinstance(value, list) and value and all(isinstance(kv, tuple) and len(kv) == 2
                                                 for kv in value):
        return dict(value)
    return value


def _part_text(part: Any) -> Optional[str]:
    """The part's text; None for a text part without any (skipped, as vLLM does)."""
    if isinstance(part, str):
        return part
    part = _as_mapping(part)
    if not isinstance(part, dict):
        raise ValueError("a content part must be a string or a mapping {type, text}")
    field = TEXT_PARTS.get(part.get("type"))
    if field is None:
        raise ValueError(f"a content part of type {part.get('type')!r} is not text; only text "
                         f"parts are supported")
    text = part.get(field)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"a {part['type']} content part needs a string {field!r}")
    return text


def text_messages(messages: Any) -> Any:
    """`messages` with each content as a string (raises ValueError, one line, for a message
    without string role and string-or-parts content). A value that is not a non-empty list is
    returned as is, for the caller's own message."""
    if not isinstance(messages, list) or not messages:
        return messages
    out = []
    for m in map(_as_mapping, messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message needs string 'role' and 'content'")
        content = m.get("content")
        if content is None:
            content = []
        if isinstance(content, list):
            content = "\n".join(t for t in map(_part_text, content) if t is not None)
        if not isinstance(content, str):
            raise ValueError("each message needs string 'role' and 'content'")
        out.append({**m, "content": content})
    return out
