"""Stream input rows by batches: Parquet/CSV/JSON through pyarrow.dataset, or a `datasets` dataset.

Memory stays bounded: only row counts are read up front (Parquet footers), and rows are read one
batch at a time, skipping whole files and row groups that fall outside the requested range.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.dataset as ds

from llmbatch.io.input_schema import MergedSchema, cast_error, merge_schemas
from llmbatch.io.read_errors import read_error
from llmbatch.jobs.errors import InvalidInputError

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json",
               ".jsonl": "json", ".ndjson": "json"}


def _format_of(path: str) -> Optional[str]:
    lower = path.lower()
    for ext in (".gz", ".bz2", ".zst"):
        if lower.endswith(ext):
            lower = lower[: -len(ext)]
    return _EXTENSIONS.get(os.path.splitext(lower)[1])


def _hidden(relpath: str) -> bool:
    # Same rule as pyarrow's discovery: names starting with "_" or "." are metadata, not data.
    return any(part.startswith(("_", ".")) for part in relpath.replace("\\", "/").split("/"))


def _saved_by_datasets(walker, root: str) -> bool:
    """A `save_to_disk` folder (Dataset: state.json and dataset_info.json; DatasetDict:
    dataset_dict.json): its metadata .json files would otherwise be read as JSON Lines input."""
    def has(name: str) -> bool:
        return walker.isfile(root.rstrip("/") + "/" + name)

    return has("dataset_dict.json") or (has("state.json") and has("dataset_info.json"))


def _expand(path: str) -> tuple[object, list[str]]:
    """One input.path entry -> (filesystem or None for local, sorted list of files)."""
    if "://" in path:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(path)
        except Exception as exc:  # unknown protocol, missing driver package, bad URL
            raise InvalidInputError(f"input.path {path}: {exc}") from None
    else:
        import fsspec.implementations.local

        fs, root = None, os.path.abspath(os.path.expanduser(path))
        local = fsspec.implementations.local.LocalFileSystem()
    walker = fs if fs is not None else local
    try:
        if any(ch in root for ch in "*?["):
            files = sorted(p for p in walker.glob(root) if walker.isfile(p))
            if not files:
                raise InvalidInputError(f"input.path: no files match {path}")
        elif walker.isdir(root):
            if _saved_by_datasets(walker, root):
                raise InvalidInputError(f"input.path {path} is a `datasets` save_to_disk "
                                        f"folder; name it as input.dataset instead")
            files = sorted(p for p in walker.find(root)
                           if not _hidden(os.path.relpath(p, root)) and _format_of(p))
            if not files:
                raise InvalidInputError(f"input.path: directory {path} holds no "
                                        f"parquet/csv/json files")
        elif walker.isfile(root):
            files = [root]
        else:
            raise InvalidInputError(f"input.path: {path} does not exist")
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"input.path {path}: {type(exc).__name__}: {exc}") from None
    return fs, files


class InputSource:
    """Rows of the input, addressed by global row index (0-based, in input order)."""

    def __init__(self, schema: pa.Schema, description: str) -> None:
        self.schema = schema
        self.description = description

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def iter_batches(self, start: int, end: int, columns: Sequence[str],
                     batch_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Yield (global index of the batch's first row, batch) covering rows [start, end);
        only `columns` are read."""
        raise NotImplementedError

    def check_readable(self, columns: Sequence[str],
                       required: Optional[dict[str, str]] = None) -> None:
        """InvalidInputError (one line) if one of `columns` cannot be read as one type, or a
        file lacks one of the `required` columns (name -> job key)."""
        # One table (TableSource) has one type per column: nothing to refuse.


class ArrowDatasetSource(InputSource):
    def __init__(self, dataset: ds.Dataset, description: str, fmt: str = "parquet",
                 filesystem=None) -> None:
        self._dataset = dataset
        self._format, self._filesystem = fmt, filesystem   # for read errors
        self._fragments = list(dataset.get_fragments())
        self._counts: Optional[list[int]] = None
        self._merged = self._merged_schema(dataset)
        super().__init__(self._merged.schema, description)

    def _merged_schema(self, dataset: ds.Dataset) -> MergedSchema:
        """One schema over all files (input_schema.py); the dataset's own for one file."""
        if len(self._fragments) < 2:
            path = self._fragments[0].path if self._fragments else ""
            return MergedSchema(self._decoded(dataset.schema, path), {})
        schemas = []
        for fragment in self._fragments:   # a Parquet footer: kept for count_rows and row groups
            try:
                schema = fragment.physical_schema
            except (pa.ArrowException, OSError) as exc:
                raise read_error(exc, self._format, fragment.path, self._filesystem) from None
            schemas.append((fragment.path, self._decoded(schema, fragment.path)))
        return merge_schemas(schemas)

    def _decoded(self, schema: pa.Schema, path: str) -> pa.Schema:
        """`schema`, once its column names decode: pyarrow's CSV reader takes a header's bytes
        as they are, and a latin-1 name ('caf\\xe9') raised UnicodeDecodeError wherever the
        names were first read (an internal error)."""
        try:
            schema.names
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"cannot read input {path} as {self._format}: a column "
                                    f"name is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} "
                                    f"at position {exc.start}); convert the file to UTF-8") \
                from None
        return schema

    def _fragment_counts(self) -> list[int]:
        if self._counts is None:
            counts = []
            for fragment in self._fragments:   # one at a time, to name the file that fails
                try:
                    counts.append(fragment.count_rows())
                except (pa.ArrowException, OSError) as exc:
                    raise read_error(exc, self._format, fragment.path, self._filesystem) \
                        from None
            self._counts = counts
        return self._counts

    @property
    def num_rows(self) -> int:
        return sum(self._fragment_counts())

    def _pieces(self, fragment) -> list[tuple[object, int]]:
        """Parquet files split into row groups (metadata row counts); other formats whole."""
        if isinstance(fragment, ds.ParquetFileFragment):
            groups = fragment.split_by_row_group()
            return [(g, g.row_groups[0].num_rows) for g in groups]
        return [(fragment, fragment.count_rows())]

    def check_readable(self, columns, required=None):
        self._merged.check(columns, required)

    def iter_batches(self, start, end, columns, batch_size):
        self.check_readable(columns)
        offset = 0
        for fragment, count in zip(self._fragments, self._fragment_counts()):
            if offset >= end:
                return
            if offset + count <= start:
                offset += count
                continue
            for piece, piece_rows in self._pieces(fragment):
                if offset >= end:
                    return
                if offset + piece_rows <= start:
                    offset += piece_rows
                    continue
                try:
                    batches = piece.to_batches(schema=self.schema, columns=list(columns),
                                               batch_size=batch_size, use_threads=False)
                    for batch in batches:
                        lo, hi = max(start, offset), min(end, offset + batch.num_rows)
                        if hi > lo:
                            yield lo, batch.slice(lo - offset, hi - lo)
                        offset += batch.num_rows
                        if offset >= end:
                            return
                except (pa.ArrowException, OSError) as exc:
                    raise (cast_error(piece, piece.path, self._merged, columns)
                           or read_error(exc, self._format, piece.path, self._filesystem)) \
                        from None


class TableSource(InputSource):
    """An in-memory or memory-mapped Arrow table (a `datasets` dataset's backing table)."""

    def __init__(self, table: pa.Table, description: str) -> None:
        super().__init__(table.schema, description)
        self._table = table

    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    def iter_batches(self, start, end, columns, batch_size):
        part = self._table.slice(start, max(0, end - start)).select(list(columns))
        offset = start
        for batch in part.to_batches(max_chunksize=batch_size):
            yield offset, batch
            offset += batch.num_rows


def _open_datasets(section, progress_bars: bool) -> TableSource:
    from llmbatch.io.hub_datasets import load_dataset_table

    # Whether input.split was given (YAML or --set) or left at its default: a saved single
    # Dataset has no splits, and only a split asked for explicitly is refused there.
    split_set = "split" in section.model_fields_set
    return TableSource(*load_dataset_table(section.dataset, section.split, split_set,
                                           progress_bars))


def _file_format(fmt: str, text_columns: Sequence[str] = ()):
    """pyarrow's format for `fmt`. CSV text is taken without UTF-8 validation, as JSON Lines
    text is: a latin-1 value is then its row's error (io/column_values.py) instead of typing
    the column binary (a job error) or, past the first block, failing the read mid-run.
    `text_columns` (the prompt column) are read as text: pyarrow typed a CSV prompt column of
    digits ("123") int64, and the job was refused."""
    if fmt != "csv":
        return fmt
    import pyarrow.csv as pacsv

    return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(
        check_utf8=False, column_types={name: pa.string() for name in text_columns}))


def read_columns(section, per_row: Sequence[str] = ()) -> list[str]:
    """The input columns a job reads: prompt (or messages), kept, per-row and id columns."""
    named = [section.messages_column or section.prompt_column, *section.keep_columns, *per_row,
             *([section.id_column] if section.id_column else [])]
    return list(dict.fromkeys(named))


def open_input(section, progress_bars: bool = False, per_row: Sequence[str] = ()) -> InputSource:
    """`input` section -> InputSource (raises InvalidInputError with one line).
    `progress_bars`: datasets' and the hub's own bars while a dataset loads (--progress bar
    or log); off by default. `per_row`: the job's sampling.per_row columns. Only the columns
    the job reads (read_columns) must have one type in every input file, checked here, before
    a model loads; other columns are never read."""
    if section.dataset is not None:
        return _open_datasets(section, progress_bars)
    paths = section.path if isinstance(section.path, list) else [section.path]
    filesystem, files = None, []
    for p in paths:
        fs, found = _expand(p)
        if files and (fs is None) != (filesystem is None):
            raise InvalidInputError("input.path: cannot mix local paths and URLs")
        filesystem = fs
        files.extend(found)
    _refuse_repeated_files(files, filesystem)
    # pyarrow's datasets decompress .gz and .bz2 by extension, not .zst: such a file was read
    # as its compressed bytes (an internal error for CSV, a parse error for JSON Lines).
    zstd = next((f for f in files if f.lower().endswith(".zst")), None)
    if zstd is not None:
        raise InvalidInputError(f"input.path: {zstd} is zstd-compressed, which the input "
                                f"reader does not decompress (gzip and bzip2 it does); "
                                f"decompress it (zstd -d) or use .gz")
    fmt = section.format
    if fmt == "auto":
        formats = {_format_of(f) or "parquet" for f in files}
        if len(formats) > 1:
            raise InvalidInputError(f"input.path mixes formats ({', '.join(sorted(formats))}); "
                                    f"set input.format")
        fmt = formats.pop()
    description = files[0] if len(files) == 1 else f"{len(files)} {fmt} files"
    try:
        text = [] if section.messages_column else [section.prompt_column]
        dataset = ds.dataset(files, format=_file_format(fmt, text), filesystem=filesystem)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise read_error(exc, fmt, files[0], filesystem) from None
    source = ArrowDatasetSource(dataset, description, fmt, filesystem)
    source.check_readable(read_columns(section, per_row), _required_columns(section))
    return source


def _refuse_repeated_files(files: list[str], filesystem) -> None:
    """InvalidInputError when one file is read twice: listed twice in input.path, matched by
    two of its entries, or reached again through a symlink (local paths are compared after
    resolving links). Its rows ran twice and were written twice."""
    seen: dict[str, str] = {}
    for name in files:
        key = name if filesystem is not None else os.path.realpath(name)
        if key in seen:
            also = "" if seen[key] == name else f" (also as {seen[key]})"
            raise InvalidInputError(f"input.path reads {name}{also} twice: its rows would run "
                                    f"twice; name each input file once")
        seen[key] = name


def _required_columns(section) -> dict[str, str]:
    """Columns every input file must have (name -> job key): without the prompt or id column
    a file's rows cannot run or be joined. A kept or per-row column may be missing from a file
    (null there). One missing from every file is io/prompts.check_columns' error."""
    named = {section.messages_column or section.prompt_column:
             "input.messages_column" if section.messages_column else "input.prompt_column"}
    if section.id_column:
        named.setdefault(section.id_column, "input.id_column")
    return named
