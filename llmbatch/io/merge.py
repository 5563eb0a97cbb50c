"""`llmbatch merge`: check that an output folder's committed parts are one job's output, then
concatenate them into one Parquet file (no torch).

Readers of the folder see whatever parts are there; a merged file is what a pipeline takes as
"the result". So the merge refuses (one line, exit 2, nothing written) what would make that
file silently wrong: parts of different job configs (a re-sharded job whose old shards are still
there would give some rows twice and others never).
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.io.writer import METADATA_KEY
from llmbatch.jobs.errors import InvalidInputError

# What every part of one job shares (writer metadata and manifest entry alike): parts that
# differ in any of these hold rows of different row ranges or different texts.
JOB_KEYS = ("shard_count", "config_hash", "num_input_rows")
# What a part's own metadata must agree on with its manifest entry.
PART_KEYS = JOB_KEYS + ("shard", "seq", "row_start", "row_end")


def check_one_config(out_dir: str, entries: list[dict]) -> None:
    """Refuse entries (sorted by shard, seq) that disagree on any of JOB_KEYS, naming the
    differing values and the parts holding each."""
    groups: dict[tuple, list[dict]] = {}
    for entry in entries:
        groups.setdefault(tuple(entry.get(k) for k in JOB_KEYS), []).append(entry)
    if len(groups) == 1:
        return
    keys = list(groups)
    differing = [i for i, name in enumerate(JOB_KEYS) if len({k[i] for k in keys}) > 1]

    def describe(key: tuple, group: list[dict]) -> str:
        values = ", ".join(f"{JOB_KEYS[i]} {key[i]}" for i in differing)
        shards = sorted({e["shard"] for e in group})
        parts = group[0]["part"] + (f" to {group[-1]['part']}" if len(group) > 1 else "")
        label = "shard" if len(shards) == 1 else "shards"
        return f"{values} ({label} {', '.join(map(str, shards))}: {parts})"

    raise InvalidInputError(
        f"{out_dir}: committed parts come from different job configs: "
        + " vs ".join(describe(k, g) for k, g in groups.items())
        + "; merging them would double or drop rows: run every shard of one config "
          "(output.mode: overwrite) or use a new output.path")


def _read_part(path: str, entry: dict) -> pa.Table:
    """The part's rows without its key-value metadata, checked to be what its manifest entry
    records (the file could be another job's under the same name)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"cannot read committed part {path}: "
                                f"{' '.join(str(exc).split())}") from None
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    for key in PART_KEYS:
        if key in meta and key in entry and meta[key] != entry[key]:
            raise InvalidInputError(f"committed part {path} was written with {key} {meta[key]}, "
                                    f"its manifest entry records {entry[key]}; rerun the job "
                                    f"with output.mode: overwrite")
    return table.replace_schema_metadata(None)


def write_merged(out_dir: str, entries: list[dict], dest: str) -> int:
    """Concatenate the parts of `entries` (in order) into `dest`; returns the row count.

    Written under a temporary name of its own (hidden, unique: a user's `dest.tmp` is never
    touched) and renamed: a failed merge leaves `dest` as it was and no temporary behind.
    (A name, not mkstemp's file: ParquetWriter creates it with the usual umask mode.)"""
    folder = os.path.dirname(os.path.abspath(dest))
    tmp = os.path.join(folder, f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
    writer = None
    rows = 0
    try:
        for entry in entries:
            table = _read_part(os.path.join(out_dir, entry["part"]), entry)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        writer.close()
        writer = None
        os.replace(tmp, dest)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):     # the temporary this merge made
            os.remove(tmp)
        raise
    return rows
