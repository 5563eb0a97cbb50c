"""A multi-file input has one schema merged from every file's types, whatever the file order.

pyarrow.dataset used the first file's schema: a column all null there (pandas writes an
all-None column as Arrow type null) refused every later file with "Unsupported cast from
large_string to null ... set input.format", and the same files in the other order ran. Types
with no common type are one line naming the column, both types and both files, for a column the
job reads only (it refused the job over a column never read)."""

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection


def _rows(path, columns):
    source = open_input(InputSection(path=str(path)))
    rows = []
    for first, batch in source.iter_batches(0, source.num_rows, columns, 3):
        assert first == len(rows)
        rows.extend(batch.to_pylist())
    return source.schema, rows


def _error(path, columns=("x",)) -> str:
    with pytest.raises(InvalidInputError) as info:
        _rows(path, list(columns))
    assert info.value.exit_code == EXIT_INVALID
    assert "\n" not in info.value.message and "input.format" not in info.value.message
    return info.value.message


@pytest.mark.parametrize("null_first", [True, False])
def test_an_all_null_column_takes_the_other_files_type(tmp_path, null_first):
    nulls = pd.DataFrame({"prompt": ["a b", "c d"], "meta": [None, None]})
    values = pd.DataFrame({"prompt": ["e f", "g h"], "meta": ["m1", "m2"]})
    first, second = (nulls, values) if null_first else (values, nulls)
    first.to_parquet(tmp_path / "part0.parquet")
    second.to_parquet(tmp_path / "part1.parquet")
    assert pq.read_schema(tmp_path / "part0.parquet").field("meta").type == (
        pa.null() if null_first else pa.large_string())   # what pandas writes
    schema, rows = _rows(tmp_path, ["prompt", "meta"])
    assert schema.field("meta").type == pa.large_string()
    metas = [None, None, "m1", "m2"] if null_first else ["m1", "m2", None, None]
    assert [r["meta"] for r in rows] == metas
    assert [r["prompt"] for r in rows] == (["a b", "c d", "e f", "g h"] if null_first
                                           else ["e f", "g h", "a b", "c d"])


def test_an_all_null_prompt_column_in_the_first_file(tmp_path):
    pd.DataFrame({"prompt": [None, None]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"prompt": ["x", "y"]}).to_parquet(tmp_path / "b.parquet")
    schema, rows = _rows(tmp_path, ["prompt"])
    assert schema.field("prompt").type == pa.large_string()
    assert [r["prompt"] for r in rows] == [None, None, "x", "y"]


def test_an_empty_csv_column_and_a_column_only_in_a_later_file(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,meta\nx,\ny,\n")     # meta infers as null
    pcsv.write_csv(pa.table({"prompt": ["z"], "meta": ["m"], "extra": [7]}), tmp_path / "b.csv")
    schema, rows = _rows(tmp_path, ["prompt", "meta", "extra"])
    # Read as string (b.csv's type), an empty CSV cell is "", as it is with b.csv first.
    assert rows == [{"prompt": "x", "meta": "", "extra": None},
                    {"prompt": "y", "meta": "", "extra": None},
                    {"prompt": "z", "meta": "m", "extra": 7}]


def test_widening_types_merge_and_keep_every_value(tmp_path):
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int32()),
                             "t": pa.array([0.5, 1.0]),
                             "c": pa.array(["a", "b"]).dictionary_encode()}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([2**40], pa.int64()),
                             "t": pa.array([1], pa.int64()),
                             "c": pa.array(["c"], pa.large_string())}), tmp_path / "b.parquet")
    schema, rows = _rows(tmp_path, ["x", "t", "c"])
    assert (schema.field("x").type, schema.field("t").type, schema.field("c").type) == (
        pa.int64(), pa.float64(), pa.large_string())
    assert rows == [{"x": 1, "t": 0.5, "c": "a"}, {"x": 2, "t": 1.0, "c": "b"},
                    {"x": 2**40, "t": 1.0, "c": "c"}]


@pytest.mark.parametrize("int_first", [True, False])
def test_int_and_string_files_are_one_line_naming_both(tmp_path, int_first):
    ints, strings = pa.table({"x": [1, 2]}), pa.table({"x": ["u", "v"]})
    pq.write_table(ints if int_first else strings, tmp_path / "a.parquet")
    pq.write_table(strings if int_first else ints, tmp_path / "b.parquet")
    kinds = ("int64", "string") if int_first else ("string", "int64")
    assert _error(tmp_path) == (f"input files disagree on column 'x': {kinds[0]} in "
                                f"{tmp_path / 'a.parquet'}, {kinds[1]} in {tmp_path / 'b.parquet'}")


def test_jsonl_files_with_a_number_and_a_string_column(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "x": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "q", "x": "one"}\n')
    assert _error(tmp_path) == (f"input files disagree on column 'x': int64 in "
                                f"{tmp_path / 'a.jsonl'}, string in {tmp_path / 'b.jsonl'}")


def _write_x_int_then_string(folder, fmt):
    """a: prompt + x int64, b: prompt + x string, in `fmt` (parquet | csv | jsonl)."""
    if fmt == "parquet":
        pq.write_table(pa.table({"prompt": ["p", "q"], "x": [1, 2]}), folder / "a.parquet")
        pq.write_table(pa.table({"prompt": ["r"], "x": ["u"]}), folder / "b.parquet")
    elif fmt == "csv":   # each CSV file's types are inferred on their own
        (folder / "a.csv").write_text("prompt,x\np,1\nq,2\n")
        (folder / "b.csv").write_text("prompt,x\nr,u\n")
    else:
        (folder / "a.jsonl").write_text('{"prompt": "p", "x": 1}\n{"prompt": "q", "x": 2}\n')
        (folder / "b.jsonl").write_text('{"prompt": "r", "x": "u"}\n')


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_conflict_in_a_column_the_job_does_not_read_is_no_error(tmp_path, fmt):
    _write_x_int_then_string(tmp_path, fmt)
    source = open_input(InputSection(path=str(tmp_path), keep_columns=[]))
    rows = [r for _, batch in source.iter_batches(0, source.num_rows, ["prompt"], 2)
            for r in batch.to_pylist()]
    assert rows == [{"prompt": "p"}, {"prompt": "q"}, {"prompt": "r"}]
    assert source.schema.names == ["prompt", "x"]   # still listed, e.g. in "columns: ..."


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_a_conflict_in_a_column_the_job_reads_is_refused_when_opened(tmp_path, ext):
    _write_x_int_then_string(tmp_path, ext)
    with pytest.raises(InvalidInputError) as info:   # kept, or read per row: before any read
        open_input(InputSection(path=str(tmp_path), keep_columns=["x"]))
    assert info.value.message == (f"input files disagree on column 'x': int64 in "
                                  f"{tmp_path / f'a.{ext}'}, string in {tmp_path / f'b.{ext}'}")
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(path=str(tmp_path)), per_row=["x"])
    assert info.value.message.startswith("input files disagree on column 'x': int64 in ")
