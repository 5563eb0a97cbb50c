"""input.id_column must give each input row its own id (no torch).

The id is how a user joins an output row back to its input (the output contract's `id`
column). Two rows with one id make that join ambiguous: a pandas/SQL join on it pairs each
output with both inputs, silently. Resume and merge go by row ranges, so nothing would be
lost inside llmbatch, but the rows could no longer be told apart outside it. So a job whose id
column repeats a value is refused before the model loads (exit 2), as OpenAI's batch API
refuses a repeated custom_id. Null ids are not judged here: each is its own row error
(runner._requests), the rest of the job runs.

The check reads only the id column, of the WHOLE input, in every shard: each SLURM array task
sees the same answer, and a duplicate across two shards is found too. Arrow hashes the column
in C++ (count_distinct, value_counts): ten million 13-character string ids in one Parquet
file took 4.3 s on this project's 2-core CPU machine (busy with a test run at the time).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from llmbatch.jobs.errors import InvalidInputError

# A repeated value is shown in the message cut to this many characters (a long text id).
_SHOWN_CHARS = 60


def check_unique_ids(source, column: str, batch_size: int = 65536) -> None:
    """Raise InvalidInputError (one line) if two rows of `source` (an io.reader.InputSource)
    share a non-null value of `column`. Types Arrow cannot hash (lists, structs) are not
    checked."""
    chunks = [batch.column(0)
              for _, batch in source.iter_batches(0, source.num_rows, [column], batch_size)]
    if not chunks:
        return
    ids = pa.chunked_array(chunks, type=chunks[0].type)
    if pa.types.is_dictionary(ids.type):   # each chunk may carry its own dictionary
        ids = ids.cast(ids.type.value_type)
    try:
        num_distinct = pc.count_distinct(ids, mode="only_valid").as_py()
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return
    num_valid = len(ids) - ids.null_count
    if num_distinct == num_valid:
        return
    counts = pc.value_counts(ids)    # struct array: (values, counts), nulls included
    repeated = pc.filter(counts.field("values"),
                         pc.and_kleene(pc.greater(counts.field("counts"), 1),
                                       pc.is_valid(counts.field("values"))))
    # The first row, in input order, whose id an earlier row has: a walk over only the rows
    # with a repeated id, which stops at most len(repeated) + 1 rows in.
    candidates = pc.indices_nonzero(pc.fill_null(pc.is_in(ids, value_set=repeated), False))
    first_row: dict = {}
    for scalar in candidates:
        row = scalar.as_py()
        value = ids[row].as_py()
        key = "NaN" if value != value else value   # float NaN: one id, as count_distinct says
        if key in first_row:
            first, second = first_row[key], row
            break
        first_row[key] = row
    else:   # pragma: no cover - count_distinct and value_counts disagree
        first, second = candidates[0].as_py(), candidates[1].as_py()
        value = ids[first].as_py()
    shown = repr(value)
    if len(shown) > _SHOWN_CHARS:
        shown = shown[:_SHOWN_CHARS - 3] + "..."
    extra = num_valid - num_distinct
    raise InvalidInputError(
        f"input.id_column {column!r} is not unique: row {second} repeats row {first}'s id "
        f"{shown} ({extra} row{'s repeat' if extra != 1 else ' repeats'} an earlier row's id); "
        f"an id joins each output row back to its input row, so deduplicate the input or drop "
        f"input.id_column to use row indices")
