"""One readable line for an input file pyarrow cannot read in the format tried (no torch).

pyarrow's own message wraps the reason in two preambles, and a CSV parse error quotes the
offending row: a Parquet file read as CSV printed its binary bytes to the terminal. The line
names the file, the format tried and the reason (printable text only). It points at
input.format only where the file's first bytes say it may be in another format: a damaged or
truncated Parquet file, an unreadable file or a bad row in a real CSV file is no format
problem, and the hint sent users looking in the wrong place.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Optional

from llmbatch.jobs.errors import InvalidInputError

_SOURCE = re.compile(r"input source '([^']*)': (.*)", re.S)
_SCHEMA_FROM = re.compile(r"from '([^']*)'")
# A CSV parse error ends with the row it could not parse: keep the sentence, not the row.
_CSV_ROW = re.compile(r"^(.*?Expected \d+ columns?, got \d+)")
# pyarrow.json takes a column's type from the first rows it reads; a later row of another
# kind fails with this (its row number counts from the start of a block, not of the file).
_JSON_CHANGED = re.compile(r"Column\((/[^)]*)\) changed from (\w+) to (\w+)")
_MAX_REASON = 120
_HINT = "set input.format (parquet | csv | json) to the file's format"


_PARQUET_MAGIC = b"PAR1"      # a Parquet file's first (and last) four bytes
# pyarrow raises a plain OSError for its own I/O statuses (a thrift decode failure); the
# operating system's errors come as their subclasses, some without an errno.
_ERRNO = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES,
          IsADirectoryError: errno.EISDIR, NotADirectoryError: errno.ENOTDIR}


def _head(path: Optional[str], filesystem) -> Optional[bytes]:
    """The file's first 4 KiB (decompressed for .gz/.bz2/.zst, as pyarrow reads it), or None
    when it cannot be read."""
    if path is None:
        return None
    try:
        import fsspec

        # `filesystem`: the fsspec filesystem of a URL input, None for a local path.
        opened = (filesystem.open(path, "rb", compression="infer") if filesystem is not None
                  else fsspec.open(path, "rb", compression="infer"))
        with opened as f:
            return f.read(4096)
    except Exception:  # unreadable: the original reason is the better message
        return None


def _content_kind(head: bytes) -> str:
    """What the first bytes say: parquet | json (an object or array) | binary | text | empty."""
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if not head:
        return "empty"
    if b"\x00" in head:
        return "binary"
    return "json" if head.lstrip()[:1] in (b"{", b"[") else "text"


def _format_may_be_wrong(fmt: str, kind: Optional[str]) -> bool:
    if kind is None:             # the bytes could not be read: no telling, hint as before
        return True
    if kind == "empty":          # pyarrow says the file is empty; no format reads it
        return False
    if fmt == "parquet":
        return kind != "parquet"
    # CSV is any text (JSON Lines too may parse as CSV); JSON Lines starts with '{'.
    return kind in ("parquet", "binary") or kind == ("text" if fmt == "json" else "json")


def _os_error(exc: Exception) -> Optional[str]:
    """The operating system's reason ("Permission denied"), or None for a failure that is
    about the bytes read."""
    if not isinstance(exc, OSError) or type(exc) is OSError:
        return None
    code = exc.errno or _ERRNO.get(type(exc))
    return os.strerror(code) if code else type(exc).__name__


def read_error(exc: Exception, fmt: str, fallback: str, filesystem=None) -> InvalidInputError:
    """-> "cannot read input FILE as FMT: REASON[; set input.format ...]" (one line).
    `fallback` names the input when pyarrow's message does not name the file."""
    text = str(exc)
    source, schema_from = _SOURCE.search(text), _SCHEMA_FROM.search(text)
    path = source.group(1) if source else schema_from.group(1) if schema_from else None
    path = path or getattr(exc, "filename", None) or fallback
    os_reason = _os_error(exc)
    if os_reason is not None:    # unreadable (permissions, gone): the format is not the issue
        return InvalidInputError(f"cannot read input {path}: {os_reason}")
    reason = source.group(2) if source else text
    lines = reason.strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    head = _head(path, filesystem)
    kind = _content_kind(head) if head is not None else None
    if fmt == "json" and head is not None and head.lstrip()[:1] == b"[":
        # pyarrow.json reads JSON Lines only; it says "Column() changed from object to array".
        return InvalidInputError(f"cannot read input {path} as json: it is a JSON "
                                 f"array, and input.format json reads JSON Lines (one object "
                                 f"per line); convert it, e.g. jq -c '.[]'")
    changed = _JSON_CHANGED.search(reason) if fmt == "json" else None
    if changed:
        column = changed.group(1)[1:].replace("/[]", "[]").replace("/", ".")
        return InvalidInputError(f"input file {path}: column {column!r} changes from "
                                 f"{changed.group(2)} to {changed.group(3)} part-way through "
                                 f"the file; give the column one type in every row")
    reason = re.sub(r"^(Invalid|IOError): ", "", reason)   # Arrow's status code, noise here
    row = _CSV_ROW.match(reason)
    if row:
        reason = row.group(1)
    reason = "".join(ch for ch in reason if ch.isprintable()).strip().rstrip(".:")
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    if fmt == "parquet" and kind == "parquet" and "duplicate field names" in reason:
        return _repeated_column(path, filesystem)
    if fmt == "parquet" and kind == "parquet":
        # It begins as Parquet: its footer (or a page) is what failed. A cut-off copy loses
        # the footer, and pyarrow then says "magic bytes not found in footer".
        if "magic bytes not found" in reason:
            reason = "it begins as Parquet but has no Parquet footer at its end"
        return InvalidInputError(f"cannot read input {path} as parquet: the file is damaged "
                                 f"or truncated ({reason})")
    hint = f"; {_HINT}" if _format_may_be_wrong(fmt, kind) else ""
    return InvalidInputError(f"cannot read input {path} as {fmt}: {reason}{hint}")


def _repeated_column(path: str, filesystem) -> InvalidInputError:
    """A Parquet file with two columns of one name: pyarrow writes it but reads no such file
    as a dataset ("Can't unify schema with duplicate field names"); the file is not damaged."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path, filesystem=filesystem).names
        twice = next(name for name in names if names.count(name) > 1)
    except Exception:  # the footer would not read after all: say what pyarrow said
        return InvalidInputError(f"cannot read input {path} as parquet: it has more than one "
                                 f"column of one name; give each column its own name")
    return InvalidInputError(f"cannot read input {path} as parquet: it has more than one "
                             f"column named {twice!r}; give each column its own name")
