"""`llmbatch merge`: check that an output folder's committed parts are one job's output, then
concatenate them into one Parquet file (no torch).

Readers of the folder see whatever parts are there; a merged file is what a pipeline takes as
"the result". So the merge refuses (one line, exit 2, nothing written) what would make that
file silently wrong: parts of different job configs (a re-sharded job whose old shards are still
there would give some rows twice and others never), and, unless asked (--allow-partial), a
folder that does not hold every input row yet: a task that failed or never ran, a run killed
midway, a shard still running. What is missing is known without reading the input: every
entry records the job's num_input_rows and shard_count, so each shard's row range follows
(sharding.Shard.row_range), and its entries say which of those rows are committed. Entries
written by an older llmbatch lack some of these keys (num_input_rows came later; a resume reads
them with .get): the checks that need a missing key are skipped, and the merge's line says so.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.io.config_diff import describe_differences
from llmbatch.io.sharding import Shard
from llmbatch.io.writer import ENTRY_KEYS, entry_output_rows, first_mismatch, part_metadata
from llmbatch.jobs.errors import InvalidInputError

# What every part of one job shares (writer metadata and manifest entry alike): parts that
# differ in any of these hold rows of different row ranges or different texts.
JOB_KEYS = ("shard_count", "config_hash", "num_input_rows")
# What a part's own metadata must agree on with its manifest entry.
PART_KEYS = JOB_KEYS + ENTRY_KEYS
OLDER_NOTE = "not checked: parts written by an older llmbatch"


def lacking_keys(entries: list[dict]) -> list[str]:
    """The JOB_KEYS some entry lacks (written by an older llmbatch)."""
    return [k for k in JOB_KEYS if any(k not in e for e in entries)]


def job_value(entries: list[dict], key: str):
    """The value of `key` in the entries that record it (check_one_config made them agree),
    or None when none does."""
    return next((e[key] for e in entries if key in e), None)


def check_one_config(out_dir: str, entries: list[dict]) -> None:
    """Refuse entries (sorted by shard, seq) that disagree on any of JOB_KEYS, naming the
    differing values and the parts holding each. Each key is compared across the entries that
    record it: an older build's entry lacks some (a folder whose shards ran across an upgrade
    mixes both), and lacking a key is not a difference."""
    names = [k for k in JOB_KEYS if len({e[k] for e in entries if k in e}) > 1]
    if not names:
        return
    # Grouped by the keys that differ, over the entries recording all of them (if those are
    # fewer than two groups, by the first differing key alone).
    groups: dict[tuple, list[dict]] = {}
    for entry in entries:
        if all(k in entry for k in names):
            groups.setdefault(tuple(entry[k] for k in names), []).append(entry)
    if len(groups) < 2:
        names, groups = names[:1], {}
        for entry in entries:
            if names[0] in entry:
                groups.setdefault((entry[names[0]],), []).append(entry)

    def describe(key: tuple, group: list[dict]) -> str:
        values = ", ".join(f"{name} {value}" for name, value in zip(names, key))
        shards = sorted({e["shard"] for e in group})
        parts = group[0]["part"] + (f" to {group[-1]['part']}" if len(group) > 1 else "")
        label = "shard" if len(shards) == 1 else "shards"
        return f"{values} ({label} {', '.join(map(str, shards))}: {parts})"

    # Two configs whose entries record their settings: also the settings that differ
    # (shard.count is named above when it differs).
    recorded = [g[0].get("settings") for g in groups.values()]
    differ = describe_differences(*recorded, arrow="vs", skip=("shard.count",)) \
        if len(recorded) == 2 and all(isinstance(r, dict) for r in recorded) else ""
    raise InvalidInputError(
        f"{out_dir}: committed parts come from different job configs: "
        + " vs ".join(describe(k, g) for k, g in groups.items())
        + (f", which differ in {differ}" if differ else "")
        + "; merging them would double or drop rows: run every shard of one config "
          "(output.mode: overwrite) or use a new output.path")


@dataclass
class Coverage:
    """Which input rows the committed parts of one job config hold."""

    num_input_rows: Optional[int]      # None: not known, completeness not checked
    # (shard, row_start, row_end, shard has no parts at all), in row order
    missing: list[tuple[int, int, int, bool]] = field(default_factory=list)
    # shards a live run holds the lock of -> its pid (None: not recorded)
    running: dict[int, Optional[str]] = field(default_factory=dict)
    # the checks skipped for entries of an older llmbatch ("config", "completeness")
    unchecked: list[str] = field(default_factory=list)

    @property
    def num_missing(self) -> int:
        return sum(end - start for _, start, end, _ in self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.running

    def describe_missing(self, max_shards: int = 3) -> str:
        """'shard 0: rows [4, 5); shard 2: no parts, rows [20, 30)', the first few shards."""
        by_shard: dict[int, list[str]] = {}
        for shard, start, end, no_parts in self.missing:
            by_shard.setdefault(shard, []).append(
                ("no parts, " if no_parts else "") + f"rows [{start}, {end})")
        text = [f"shard {k}: {', '.join(v)}" for k, v in list(by_shard.items())[:max_shards]]
        more = len(by_shard) - max_shards
        return "; ".join(text) + (f"; and {more} more shards" if more > 0 else "")

    def describe_running(self) -> str:
        """'shard 1 (pid 12)' or 'shards 0 (pid 12), 1'."""
        names = [f"{k}" + (f" (pid {pid})" if pid else "") for k, pid in self.running.items()]
        return ("shard " if len(names) == 1 else "shards ") + ", ".join(names)


def coverage(out_dir: str, entries: list[dict], running: dict[int, Optional[str]]) -> Coverage:
    """The rows missing from `entries` (one config, checked by check_one_config; sorted by
    shard, seq). An entry outside its shard's range or overlapping the one before is a
    damaged manifest: merging it would double rows, so that refuses. When no entry records
    num_input_rows or shard_count the rows are not known: only running shards are found."""
    lacking = lacking_keys(entries)
    unchecked = ["config"] if {"config_hash", "shard_count"} & set(lacking) else []
    # The job's row count and shard count from any entry that records them (they agree).
    num_rows, count = job_value(entries, "num_input_rows"), job_value(entries, "shard_count")
    if num_rows is None or count is None:
        return Coverage(None, running=running, unchecked=unchecked + ["completeness"])
    cov = Coverage(num_rows, running=running, unchecked=unchecked)
    by_shard: dict[int, list[dict]] = {}
    for entry in entries:
        by_shard.setdefault(entry["shard"], []).append(entry)
    for k in sorted(set(by_shard) | set(range(count))):
        if k >= count:
            raise InvalidInputError(f"{out_dir}: manifest entry of {by_shard[k][0]['part']} "
                                    f"is of shard {k}, the job has {count} shards; rerun the "
                                    f"job with output.mode: overwrite")
        start, end = Shard(k, count).row_range(num_rows)
        cursor = start          # first row of the shard not yet accounted for
        for entry in by_shard.get(k, []):
            lo, hi = entry["row_start"], entry["row_end"]
            if lo < cursor or hi > end or hi < lo:
                raise InvalidInputError(
                    f"{out_dir}: manifest entry of {entry['part']} records rows [{lo}, {hi}), "
                    f"not after row {cursor} within shard {k}'s rows [{start}, {end}); rerun "
                    f"the job with output.mode: overwrite")
            if lo > cursor:
                cov.missing.append((k, cursor, lo, False))
            cursor = hi
        if cursor < end:
            cov.missing.append((k, cursor, end, k not in by_shard))
    return cov


def check_complete(out_dir: str, cov: Coverage) -> None:
    """Refuse a merge of what `cov` finds incomplete (the caller skips this for
    --allow-partial): a still running shard first, as it explains its missing rows."""
    if cov.running:
        verb = "is being written by a running job" if len(cov.running) == 1 else \
            "are being written by running jobs"
        raise InvalidInputError(f"{out_dir}: {cov.describe_running()} {verb}; wait for it to "
                                f"end, or pass --allow-partial to merge what is committed now")
    if cov.missing:
        committed = cov.num_input_rows - cov.num_missing
        raise InvalidInputError(f"{out_dir}: incomplete: {cov.num_missing} of "
                                f"{cov.num_input_rows} rows not committed "
                                f"({cov.describe_missing()}); rerun the job for them, or pass "
                                f"--allow-partial to merge the {committed} committed rows")


def summary(num_parts: int, num_rows: int, dest: str, cov: Coverage,
            num_output_rows: Optional[int] = None) -> str:
    """The merge's output line; a partial merge says how many rows of how many, and why; a
    merge of an older llmbatch's parts, which checks it skipped. num_rows: input rows;
    num_output_rows: the merged file's rows, named when sampling.n > 1 made them more."""
    parts = f"{num_parts} part{'s' if num_parts != 1 else ''}"
    written = f" ({num_output_rows} output rows)" \
        if num_output_rows is not None and num_output_rows != num_rows else ""
    notes = []
    if cov.missing:
        notes.append(f"{cov.num_missing} rows not committed; {cov.describe_missing()}")
    if cov.running:
        notes.append(f"{cov.describe_running()} still running")
    of = f" of {cov.num_input_rows}" if notes and cov.num_input_rows is not None else ""
    notes = [f"partial: {'; '.join(notes)}"] if notes else []
    if cov.unchecked:
        notes.append(f"{' and '.join(cov.unchecked)} {OLDER_NOTE}")
    return (f"merged {parts}, {num_rows}{of} rows{written} -> {dest}"
            + (f" ({'; '.join(notes)})" if notes else ""))


def check_parts_exist(out_dir: str, entries: list[dict]) -> None:
    """Refuse, before writing anything, committed parts whose file is gone: a resume un-commits
    such a part (and the later ones of its shard) and computes its rows again (Manifest.recover),
    so rerunning the job is the fix. Only "not there" is checked here (a stat per part): a file
    that cannot be looked at or read fails when read, with its own reason."""
    missing = []
    for entry in entries:
        path = os.path.join(out_dir, entry["part"])
        try:
            os.stat(path)
        except FileNotFoundError:
            missing.append(path)
        except OSError:
            pass
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidInputError(f"committed part {missing[0]} is missing{more}; rerun the job "
                                f"(a resume computes missing parts again), then merge")


def _read_part(path: str, entry: dict) -> pa.Table:
    """The part's rows without its key-value metadata, checked to be what its manifest entry
    records (the file could be another job's under the same name)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"cannot read committed part {path}: "
                                f"{' '.join(str(exc).split())}") from None
    meta = part_metadata(table.schema)
    key = first_mismatch(meta, entry, PART_KEYS)
    if key is not None:
        raise InvalidInputError(f"committed part {path} was written with {key} {meta[key]}, "
                                f"its manifest entry records {entry[key]}; rerun the job "
                                f"with output.mode: overwrite")
    if table.num_rows != entry_output_rows(entry):   # entries are shape-checked (manifest.py)
        raise InvalidInputError(f"committed part {path} holds {table.num_rows} rows, its "
                                f"manifest entry records {entry_output_rows(entry)}; run the "
                                f"job again (output.mode: resume) to produce it again, then merge")
    return table.replace_schema_metadata(None)


def check_dest_format(dest: str) -> None:
    """Refuse a `dest` not named *.parquet (any case): the merge writes Parquet only, and
    `-o all.csv` wrote Parquet under a .csv name, which readers going by the suffix misread."""
    if not dest.lower().endswith(".parquet"):
        raise InvalidInputError(f"--out {dest}: merge writes Parquet only; name a file "
                                f"ending in .parquet")


def check_dest_folder(dest: str) -> None:
    """Refuse a `dest` whose folder is not there to write into: missing, or a file on its path
    ('is not a directory': 'does not exist' misled when the file is right there)."""
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        if os.path.isdir(folder):
            return
        os.stat(folder)
    except FileNotFoundError:
        raise InvalidInputError(f"--out {dest}: folder {folder} does not exist") from None
    except NotADirectoryError:
        pass                               # a file further up: named below
    except OSError as exc:                 # cannot even look (a folder without x permission)
        raise _dest_error(dest, exc) from None
    # The nearest existing path above the destination is not a folder: name it.
    path = folder
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    raise InvalidInputError(f"--out {dest}: {path} is not a directory")


def _dest_error(dest: str, exc: OSError) -> InvalidInputError:
    """A destination that cannot be written (a read-only mount, no permission, a full disk):
    the user's choice of --out, so exit 2 with the OS reason, not an internal error. pyarrow's
    text names the hidden temporary; the errno's own words do not."""
    reason = os.strerror(exc.errno) if exc.errno else " ".join(str(exc).split())
    return InvalidInputError(f"--out {dest}: cannot write it: {reason}")


def _merged_schema(out_dir: str, entries: list[dict]) -> pa.Schema:
    """One schema for every part (footers only). Parts of one folder can differ in a kept
    column's type: a folder resumed across the version that merged multi-file input schemas
    (a column int32 in the first input file and int64 in another was written as int32
    before, int64 after). Types unify as in a multi-file input (permissive: int32 + int64
    -> int64, string + large_string -> large_string); ParquetWriter takes one schema."""
    schemas = []
    for entry in entries:
        path = os.path.join(out_dir, entry["part"])
        try:
            schemas.append(pq.read_schema(path).remove_metadata())
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(f"cannot read committed part {path}: "
                                    f"{' '.join(str(exc).split())}") from None
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidInputError(f"the committed parts of {out_dir} disagree on their columns "
                                f"({' '.join(str(exc).split())}); rerun the job with "
                                f"output.mode: overwrite") from None


def _cast_part(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    if table.schema == schema:
        return table
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InvalidInputError(f"committed part {path} does not fit the other parts' columns "
                                f"({' '.join(str(exc).split())}); rerun the job with "
                                f"output.mode: overwrite") from None


def write_merged(out_dir: str, entries: list[dict], dest: str) -> int:
    """Concatenate the parts of `entries` (in order) into `dest`; returns the row count.

    Written under a temporary name of its own (hidden, unique: a user's `dest.tmp` is never
    touched) and renamed: a failed merge leaves `dest` as it was and no temporary behind.
    (A name, not mkstemp's file: ParquetWriter creates it with the usual umask mode.)"""
    folder = os.path.dirname(os.path.abspath(dest))
    tmp = os.path.join(folder, f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
    writer = None
    rows = 0
    schema = _merged_schema(out_dir, entries) if entries else None
    try:
        for entry in entries:
            path = os.path.join(out_dir, entry["part"])
            table = _cast_part(_read_part(path, entry), schema, path)
            try:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            except OSError as exc:
                raise _dest_error(dest, exc) from None
            rows += table.num_rows
        try:
            writer.close()
            writer = None
            os.replace(tmp, dest)
        except OSError as exc:
            raise _dest_error(dest, exc) from None
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except OSError:         # the write had failed: its error is the one to report
                pass
        if os.path.exists(tmp):     # the temporary this merge made
            os.remove(tmp)
        raise
    return rows
