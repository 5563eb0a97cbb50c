"""Chat messages checked and their content made text: a string, or OpenAI-style parts.

vLLM's LLM.chat and the OpenAI API take a message's content as a string or as a list of parts
({"type": "text", "text": ...}); datasets in that format store every content as parts. For a
template that renders text (the models llmbatch runs take no images), vLLM joins the text parts
with "\\n"; so do we, and a part that is not text is the row's error. A Parquet struct column
gives every part all the fields any part has (None where a part lacks one): only `type` and
`text` are read.
"""

from __future__ import annotations

from typing import Any


def _part_text(part: Any) -> str:
    if not isinstance(part, dict):
        raise ValueError("a content part must be a mapping {type, text}")
    kind = part.get("type")
    if kind != "text":
        raise ValueError(f"a content part of type {kind!r} is not text; only text parts are "
                         f"supported")
    if not isinstance(part.get("text"), str):
        raise ValueError("a text content part needs a string 'text'")
    return part["text"]


def text_messages(messages: Any) -> Any:
    """`messages` with each content as a string (raises ValueError, one line, for a message
    without string role and string-or-parts content). A value that is not a non-empty list is
    returned as is, for the caller's own message."""
    if not isinstance(messages, list) or not messages:
        return messages
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message needs string 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list) and content:
            content = "\n".join(_part_text(part) for part in content)
        if not isinstance(content, str):
            raise ValueError("each message needs string 'role' and 'content'")
        out.append({**m, "content": content})
    return out
