"""An exception as one line of text, for the messages that end a run (no torch).

Errors reach users as one line (cli.py prints them and exits); an exception's text can span
lines (pyarrow, torch.distributed and the Hub client all write several) or be empty.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300, first_line: bool = False,
             with_type: bool = False) -> str:
    """`exc`'s text on one line: whitespace runs (newlines too) become one space, or with
    `first_line` only the first non-blank line is kept; cut to `limit` characters ending in
    '...'. Empty text gives the type's name; `with_type` prefixes 'TypeName: '."""
    text = str(exc).strip()
    if first_line:
        text = (text.splitlines() or [""])[0]
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text
