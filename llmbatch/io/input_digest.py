"""Digests of the input rows a part was written from, so a resume can tell a changed input.

A resume skips the rows of committed parts. Before this check, only the input's row count was
compared with the folder's: an input re-exported in another order, or with prompts edited,
kept its row count, and the resumed folder mixed answers to the old rows with answers to the
new ones (ids of one row beside the answer of another), exit 0.

Each manifest entry now records `input_digest`: a digest of the values, in the columns the job
reads (io/reader.read_columns), of the input rows [row_start, row_end) its part was written
from. A resume recomputes it for every committed part of its shard and refuses on a
difference (ResumeError, exit 2). Entries written before this have no digest and are not
checked.

The digest does not depend on how the input is cut into batches (input.batch_size, row groups,
files): each row has its own digest (ROW_DIGEST_BYTES of blake2b over its values, each
length-prefixed), and a part's digest is blake2b over its rows' digests in row order.
Text and binary values are hashed as their bytes (CSV text is read without UTF-8 checks, so a
value may not decode); numbers and times as Arrow's text of them, tagged with their kind (int,
float, ...); nested values as JSON with their text as bytes (dict keys sorted; repr for what
JSON cannot hold).
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Optional, Sequence

import pyarrow as pa

from llmbatch.io.arrow_text import binary_leaves, is_text
from llmbatch.jobs.errors import InternalError, ResumeError

ENTRY_KEY = "input_digest"
ROW_DIGEST_BYTES = 16
_NULL = b"\xff" * 8          # a length prefix no value has: null differs from "" and b""


def _value_bytes(column: pa.Array) -> list[Optional[bytes]]:
    """Each value of `column` as bytes (None for a null), never decoding text: a value that
    is not valid UTF-8 is its row's error later (column_values.py), not this job's end."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if is_text(kind):
        column = column.cast(pa.large_binary())        # a view: no UTF-8 decoding
        kind = column.type
    elif _number_kind(kind) is not None:
        try:   # vectorized (json.dumps per value cost ~2 us a value), tagged with the kind:
            # Arrow writes 2.0 as "2", which would read the same as the integer 2.
            tag = _number_kind(kind)
            text = column.cast(pa.large_string()).cast(pa.large_binary()).to_pylist()
            return [None if value is None else tag + value for value in text]
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            pass
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) \
            or pa.types.is_fixed_size_binary(kind):
        return column.to_pylist()
    try:   # nested (messages, lists): text leaves as bytes, then JSON
        values = column.cast(binary_leaves(kind)).to_pylist()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):   # none found that cannot cast
        values = column.to_pylist()
    return [None if value is None else
            json.dumps(value, sort_keys=True, default=repr, ensure_ascii=False)
            .encode("utf-8", "surrogatepass")
            for value in values]


def _number_kind(kind: pa.DataType) -> Optional[bytes]:
    """The tag of a number-like type whose values are digested as text, else None."""
    for test, tag in ((pa.types.is_integer, b"i:"), (pa.types.is_floating, b"f:"),
                      (pa.types.is_boolean, b"b:"), (pa.types.is_decimal, b"d:"),
                      (pa.types.is_temporal, b"t:")):
        if test(kind):
            return tag
    return None


def row_digests(batch, columns: Sequence[str]) -> list[bytes]:
    """One ROW_DIGEST_BYTES digest per row of `batch` (a RecordBatch or Table holding
    `columns`), over the row's values in `columns` order."""
    encoded = []
    for name in columns:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        encoded.append([_NULL if v is None else len(v).to_bytes(8, "little") + v
                        for v in _value_bytes(column)])
    return [hashlib.blake2b(b"".join(values), digest_size=ROW_DIGEST_BYTES).digest()
            for values in zip(*encoded)] if encoded else [b""] * batch.num_rows


def part_digest(digests: Iterable[bytes]) -> str:
    """The digest a manifest entry records for rows whose row_digests are `digests`, in
    row order."""
    combined = hashlib.blake2b(digest_size=ROW_DIGEST_BYTES)
    for digest in digests:
        combined.update(digest)
    return combined.hexdigest()


class RowDigests:
    """Row digests of the rows read so far and not yet committed (the committer takes a part's
    digests when it writes the part's entry)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self._digests: dict[int, bytes] = {}

    def add(self, first_row: int, batch) -> None:
        for i, digest in enumerate(row_digests(batch, self.columns)):
            self._digests[first_row + i] = digest

    def take(self, lo: int, hi: int) -> Optional[str]:
        """The part digest of rows [lo, hi), forgetting them; None if a row was never added
        (a custom source that yields no batches for it: nothing to record then)."""
        if any(row not in self._digests for row in range(lo, hi)):
            return None
        return part_digest(self._digests.pop(row) for row in range(lo, hi))


def check_input_rows(entries: list[dict], num_rows: int, key_value: str) -> None:
    """ResumeError unless the input has the row count the folder's `entries` (any shard's:
    each records the whole input's count) were written for. Only this shard's were compared,
    so shard 1 resumed on a grown input after shard 0 finished, and a row fell between their
    ranges. Checked before the manifest's own contiguity: another count moves the shard's
    row range, which read as a damaged manifest."""
    written_for = next((e.get("num_input_rows") for e in entries
                        if e.get("num_input_rows") is not None), None)
    if written_for is not None and written_for != num_rows:
        raise ResumeError(f"output.path {key_value} was written for an input of {written_for} "
                          f"rows, the input now has {num_rows}; set output.mode: overwrite to "
                          f"start over")


def check_committed_inputs(source, columns: Sequence[str], intact: list[dict], batch_size: int,
                           key_value: str) -> None:
    """ResumeError unless each part of `intact` (one shard's entries whose part files are
    sound, in row order) was written from the rows `source` holds now. Reads those rows
    once."""
    checked = [e for e in intact if isinstance(e.get(ENTRY_KEY), str)]
    if not checked:
        return
    lo, hi = checked[0]["row_start"], checked[-1]["row_end"]
    digests, pending = RowDigests(columns), iter(checked)
    entry = next(pending)
    try:
        for first, batch in source.iter_batches(lo, hi, columns, batch_size):
            digests.add(first, batch)
            # Entry by entry as its rows arrive: a shard of millions of committed rows never
            # holds all their digests at once.
            while entry is not None and first + batch.num_rows >= entry["row_end"]:
                if digests.take(entry["row_start"], entry["row_end"]) != entry[ENTRY_KEY]:
                    raise ResumeError(
                        f"output.path {key_value}: input rows [{entry['row_start']}, "
                        f"{entry['row_end']}) are not the rows {entry['part']} was written "
                        f"from (the input changed since); restore the input, or set "
                        f"output.mode: overwrite to start over")
                entry = next(pending, None)
    except (OSError, pa.ArrowException) as exc:
        raise InternalError(f"reading the input failed: {type(exc).__name__}: {exc}") from exc
