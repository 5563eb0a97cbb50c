"""One readable line for an input file pyarrow cannot read in the format tried (no torch).

pyarrow's own message wraps the reason in two preambles, and a CSV parse error quotes the
offending row: a Parquet file read as CSV printed its binary bytes to the terminal. The line
names the file, the format tried and the reason (printable text only), and points at
input.format.
"""

from __future__ import annotations

import re
from typing import Optional

from llmbatch.jobs.errors import InvalidInputError

_SOURCE = re.compile(r"input source '([^']*)': (.*)", re.S)
_SCHEMA_FROM = re.compile(r"from '([^']*)'")
# A CSV parse error ends with the row it could not parse: keep the sentence, not the row.
_CSV_ROW = re.compile(r"^(.*?Expected \d+ columns?, got \d+)")
_MAX_REASON = 120
_HINT = "set input.format (parquet | csv | json) to the file's format"


def _is_json_array(path: Optional[str], filesystem) -> bool:
    """Whether the file's first non-blank byte is '[' (a JSON array, not JSON Lines)."""
    if path is None:
        return False
    try:
        # `filesystem`: the fsspec filesystem of a URL input, None for a local path.
        with (filesystem.open(path, "rb") if filesystem is not None else open(path, "rb")) as f:
            head = f.read(4096)
    except Exception:  # unreadable: the original reason is the better message
        return False
    return head.lstrip()[:1] == b"["


def read_error(exc: Exception, fmt: str, fallback: str, filesystem=None) -> InvalidInputError:
    """-> "cannot read input FILE as FMT: REASON; set input.format ..." (one line).
    `fallback` names the input when pyarrow's message does not name the file."""
    text = str(exc)
    source, schema_from = _SOURCE.search(text), _SCHEMA_FROM.search(text)
    path = source.group(1) if source else schema_from.group(1) if schema_from else None
    reason = source.group(2) if source else text
    lines = reason.strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    if fmt == "json" and _is_json_array(path or fallback, filesystem):
        # pyarrow.json reads JSON Lines only; it says "Column() changed from object to array".
        return InvalidInputError(f"cannot read input {path or fallback} as json: it is a JSON "
                                 f"array, and input.format json reads JSON Lines (one object "
                                 f"per line); convert it, e.g. jq -c '.[]'")
    reason = re.sub(r"^(Invalid|IOError): ", "", reason)   # Arrow's status code, noise here
    row = _CSV_ROW.match(reason)
    if row:
        reason = row.group(1)
    reason = "".join(ch for ch in reason if ch.isprintable()).strip().rstrip(".:")
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    return InvalidInputError(f"cannot read input {path or fallback} as {fmt}: {reason}; {_HINT}")
