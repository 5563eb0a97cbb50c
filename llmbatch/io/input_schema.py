"""One schema for a multi-file input, merged from every file's own types (no torch).

pyarrow.dataset takes the first file's schema and casts every other file to it. A column that is
all null in the first file (pandas writes an all-None column as Arrow type null) refused every
later file ("Unsupported cast from large_string to null"), while the same files in the other
order ran; a real conflict (int in one file, string in another) came out as a damaged file or a
wrong input.format. Every file's schema is read here (a Parquet footer, which pyarrow keeps for
the row counts and row groups read next; the first block of a CSV or JSON file) and merged
column by column as pyarrow.unify_schemas(promote_options="permissive") merges: null takes the
other files' type, int32 widens to int64, int to double, string to large_string, a dictionary
(a pandas categorical) to its values' type. Rows are cast with pyarrow's safe casts, so a value
the merged type cannot hold exactly fails (cast_error) instead of being altered. Types with no
common type are one error naming the column, both types and both files, raised only for a column
the job reads (MergedSchema.check): type drift in a column no job setting names (int in one file,
text in another) refused the whole job, and such a column is never read (batches are projected).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa

from llmbatch.jobs.errors import InvalidInputError


def _merge(a: pa.DataType, b: pa.DataType) -> Optional[pa.DataType]:
    """The type both `a` and `b` cast to without loss, or None."""
    if a == b:
        return a
    try:
        merged = pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])],
                                  promote_options="permissive")
        return merged.field("c").type
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # pyarrow does not merge a dictionary with a plain type: a categorical column written by
    # pandas and the same column as plain strings in another file are one column of strings.
    if pa.types.is_dictionary(a) or pa.types.is_dictionary(b):
        return _merge(a.value_type if pa.types.is_dictionary(a) else a,
                      b.value_type if pa.types.is_dictionary(b) else b)
    return None


class MergedSchema:
    """The merged schema, for each column the first file of each type it has (a file to name
    beside the one whose values do not fit the merged type), and the columns whose types have no
    common type (name -> the error line). Such a column keeps the type merged from the files
    before the one that conflicts: it is listed (a missing column's error names the input's
    columns) but cannot be read."""

    def __init__(self, schema: pa.Schema,
                 origins: dict[str, list[tuple[str, pa.DataType]]],
                 conflicts: Optional[dict[str, str]] = None,
                 missing: Optional[dict[str, tuple[str, list[str]]]] = None) -> None:
        self.schema = schema
        self.origins = origins
        self.conflicts = conflicts or {}
        # column -> (the first file without it, that file's columns)
        self.missing = missing or {}

    def check(self, columns: Sequence[str], required: Optional[dict[str, str]] = None) -> None:
        """InvalidInputError (one line) for the first of `columns` the files disagree on, or
        for a `required` column (name -> its job key) that a file lacks: pyarrow reads it as
        nulls there, so every row of that file would be an error row ('prompt is null')."""
        for name in columns:
            if name in self.conflicts:
                raise InvalidInputError(self.conflicts[name])
        for name, key in (required or {}).items():
            if name in self.missing:
                path, names = self.missing[name]
                raise InvalidInputError(f"{key} {name!r} is not in {path} (its columns: "
                                        f"{', '.join(names)}); every input file needs it")

    def other_file(self, name: str, own: pa.DataType) -> Optional[tuple[str, pa.DataType]]:
        """A file where column `name` has a type other than `own`: the merged type's if any."""
        others = [(p, kind) for p, kind in self.origins.get(name, []) if kind != own]
        target = self.schema.field(name).type
        return next((o for o in others if o[1] == target), others[0] if others else None)


def merge_schemas(files: Sequence[tuple[str, pa.Schema]]) -> MergedSchema:
    """(path, schema) of each file, in input order -> MergedSchema. A column two files give
    types with no common type is a conflict (its first), refused by MergedSchema.check."""
    fields: dict[str, pa.Field] = {}            # in order of first appearance
    origins: dict[str, list[tuple[str, pa.DataType]]] = {}
    conflicts: dict[str, str] = {}
    for path, schema in files:
        for field in schema:
            name, kind = field.name, field.type
            if name not in fields:
                fields[name] = field
            elif name not in conflicts:
                merged = _merge(fields[name].type, kind)
                if merged is None:
                    first_path, first_kind = origins[name][0]
                    conflicts[name] = (f"input files disagree on column {name!r}: "
                                       f"{first_kind} in {first_path}, {kind} in {path}")
                else:
                    fields[name] = fields[name].with_type(merged).with_nullable(True)
            seen = origins.setdefault(name, [])
            if not pa.types.is_null(kind) and all(kind != k for _, k in seen):
                seen.append((path, kind))
    missing: dict[str, tuple[str, list[str]]] = {}
    for path, schema in files:
        names = schema.names                # a new list at each call: once a file
        present = set(names)
        for name in fields:
            if name not in missing and name not in present:
                missing[name] = (path, names)
    return MergedSchema(pa.schema(list(fields.values())), origins, conflicts, missing)


def cast_error(piece, path: str, merged: MergedSchema,
               columns: Sequence[str]) -> Optional[InvalidInputError]:
    """After a read of `piece` (a file or row group) failed: the line for a column whose values
    do not fit the merged type (int64 2**53 + 1 as double, a uint64 above int64's range), or
    None when the failure is not a cast (the caller reports it as a read error). Reads the
    piece's differing columns again, in the file's own types; error path only."""
    try:
        physical = piece.physical_schema
    except (pa.ArrowException, OSError):
        return None
    for name in columns:
        if name not in physical.names:
            continue
        own, target = physical.field(name).type, merged.schema.field(name).type
        if own == target:
            continue
        try:
            piece.to_table(columns=[name], use_threads=False).column(name).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            other = merged.other_file(name, own)
            beside = f"{other[1]} in {other[0]}, " if other else ""
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return InvalidInputError(f"input files disagree on column {name!r}: {beside}{own} "
                                     f"in {path}, whose values do not all fit {target} "
                                     f"({reason})")
        except (pa.ArrowException, OSError):
            return None
    return None
