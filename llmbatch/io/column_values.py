"""A batch's columns as Python values, with text that is not valid UTF-8 kept to its row.

pyarrow's JSON reader does not validate UTF-8, and a Parquet string column may hold any bytes
its writer put there; to_pylist() then raises UnicodeDecodeError for the whole batch, which
ended the job. Here only the rows holding such bytes are marked (one error line each, naming the
column), so the runner records them as error rows and the others run. Their text is decoded with
U+FFFD in place of the bad bytes (a nested value is null), so the row can still be written and
found. The fast path is one to_pylist() per column; the per-row pass runs only after it failed.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from llmbatch.io.arrow_text import is_text


def _replaced(array: pa.Array, i: int):
    """Row i of a string column decoded with U+FFFD for the bad bytes; None for other types."""
    kind = array.type
    if is_text(kind):
        raw = array.cast(pa.large_binary())[i].as_py()     # a view: bytes, not decoded
        return raw.decode("utf-8", errors="replace")
    return None


def column_values(batch: pa.RecordBatch, name: str) -> tuple[list, dict[int, str]]:
    """(values of column `name`, {row: error line} for rows whose text is not valid UTF-8)."""
    array = batch.column(batch.schema.get_field_index(name))
    try:
        return array.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    values, bad = [], {}
    for i in range(len(array)):
        try:
            values.append(array[i].as_py())
        except UnicodeDecodeError as exc:
            bad[i] = (f"input column {name!r} is not valid UTF-8 "
                      f"(byte 0x{exc.object[exc.start]:02x} at position {exc.start})")
            values.append(_replaced(array, i))
    return values, bad


def columns_values(batch: pa.RecordBatch,
                   names: Sequence[str]) -> tuple[dict[str, list], dict[int, str]]:
    """column_values of each of `names`; a row's error is that of the first bad column."""
    data, bad = {}, {}
    for name in names:
        data[name], errors = column_values(batch, name)
        for i, error in errors.items():
            bad.setdefault(i, error)
    return data, bad
