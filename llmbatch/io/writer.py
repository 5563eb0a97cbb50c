"""Atomic Parquet part files: write to a temporary name, fsync, then os.replace into place.

A reader (or a resumed job) therefore sees a part either whole or not at all. Temporary names
start with "_" so `pyarrow.dataset.dataset(output.path)` never reads them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.jobs.errors import ResumeError

METADATA_KEY = b"llmbatch"
# A part's own metadata that its manifest entry records too (io/merge.py checks more keys).
ENTRY_KEYS = ("shard", "seq", "row_start", "row_end")
MISSING = "missing"                # part_defect() of a part file that is not there at all


def part_name(shard: int, seq: int) -> str:
    return f"part-{shard:05d}-{seq:05d}.parquet"


def temp_prefix(shard: int) -> str:
    return f"_tmp-part-{shard:05d}-"


LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("logprob", pa.float64())])
# Per output token: the sampled token's logprob and the top-n alternatives.
LOGPROBS_TYPE = pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float64()),
                                    ("top", pa.list_(LOGPROB_TYPE))]))


def output_schema(input_schema: pa.Schema, keep_columns: list[str],
                  id_column: Optional[str], extra_output: Sequence[str] = ()) -> pa.Schema:
    """Kept input columns, then the fixed result columns of the output contract, with the
    optional columns named in `extra_output` (JobSpec.extra_output_columns): `sample_index`
    after `id` (sampling.n > 1), `logprobs` and `prompt_logprobs` last."""
    fields = [input_schema.field(c) for c in keep_columns]
    id_type = input_schema.field(id_column).type if id_column else pa.int64()
    fields.append(pa.field("id", id_type))
    if "sample_index" in extra_output:
        fields.append(pa.field("sample_index", pa.int32()))
    fields += [
        pa.field("output_text", pa.string()),
        pa.field("output_token_ids", pa.list_(pa.int32())),
        pa.field("finish_reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("num_prompt_tokens", pa.int64()),
        pa.field("num_cached_prompt_tokens", pa.int64()),
        pa.field("num_output_tokens", pa.int64()),
        pa.field("ttft_s", pa.float64()),
        pa.field("tpot_s", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("spec_accepted_tokens", pa.int64()),
    ]
    if "logprobs" in extra_output:
        fields.append(pa.field("logprobs", LOGPROBS_TYPE))
    if "prompt_logprobs" in extra_output:   # the same type; its first element is null
        fields.append(pa.field("prompt_logprobs", LOGPROBS_TYPE))
    return pa.schema(fields)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Row dicts (keys = schema names) -> table with exactly `schema`."""
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic_bytes(path: str, data: bytes) -> None:
    """Small files (manifest entries): temp name, fsync, rename."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f"_tmp-{name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def write_part(out_dir: str, shard: int, seq: int, table: pa.Table,
               metadata: dict[str, Any], crash_hook=None) -> str:
    """Write one part atomically; returns its final path.

    `crash_hook(stage)` is a test seam ("before_rename", "after_rename") used to prove that a
    kill between any two steps never doubles or loses rows.
    """
    final = os.path.join(out_dir, part_name(shard, seq))
    tmp = os.path.join(out_dir, f"{temp_prefix(shard)}{seq:05d}.parquet.{os.getpid()}")
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    if crash_hook:
        crash_hook("before_rename")
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    if crash_hook:
        crash_hook("after_rename")
    return final


def read_part_metadata(path: str) -> dict:
    return part_metadata(pq.read_schema(path))


def part_metadata(schema: pa.Schema) -> dict:
    """The llmbatch key-value metadata of a part's schema ({} for a file without it)."""
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


def entry_output_rows(entry: dict) -> int:
    """The rows a manifest entry's part holds: its input rows, or num_output_rows when each
    input row has sampling.n > 1 output rows."""
    return entry.get("num_output_rows", entry["row_end"] - entry["row_start"])


def first_mismatch(meta: dict, entry: dict, keys) -> Optional[str]:
    """The first of `keys` that a part's llmbatch metadata and its manifest entry both hold
    with different values, or None. A key either lacks (an older llmbatch's part) is not
    judged."""
    return next((key for key in keys if key in meta and key in entry and meta[key] != entry[key]),
                None)


def part_defect(path: str, entry: dict) -> Optional[str]:
    """Why the part file at `path` cannot be the part its manifest `entry` records ("missing";
    footer unreadable: truncated or overwritten; another row count; footer metadata naming
    another shard, seq or row range: a valid part copied over this one), or None when it can.
    Reads only the footer, so checking every committed part on resume stays cheap.
    A file that cannot even be looked at (EACCES, a stale network handle) is not called
    missing: recomputing would also redo every later part, so that refuses (ResumeError)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        raise ResumeError(f"cannot check committed part {path}: {exc}; rerun when it is "
                          f"reachable") from None
    try:
        footer = pq.ParquetFile(path)
        found = footer.metadata.num_rows
        meta = part_metadata(footer.schema_arrow)
    except (OSError, ValueError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"unreadable: {first}"
    if found != entry_output_rows(entry):
        return f"holds {found} rows, the manifest records {entry_output_rows(entry)}"
    key = first_mismatch(meta, entry, ENTRY_KEYS)
    if key is not None:
        return f"was written with {key} {meta[key]}, the manifest records {entry[key]}"
    return None
