"""A file read in the wrong input.format is one readable line naming the file, the format
tried and input.format: a Parquet file read as CSV printed binary bytes; a JSON array file
said only "Column() changed from object to array"."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection

HINT = "set input.format (parquet | csv | json) to the file's format"


def _error(path, fmt) -> str:
    with pytest.raises(InvalidInputError) as info:
        source = open_input(InputSection(path=str(path), format=fmt))
        list(source.iter_batches(0, source.num_rows, ["prompt"], 64))
    assert info.value.exit_code == EXIT_INVALID
    message = info.value.message
    assert message.isprintable() and "\n" not in message
    return message


def _parquet(path, n=50):
    # Binary-heavy content: the CSV parser's error used to quote it.
    pq.write_table(pa.table({"prompt": [f"p\x00{i}" * 5 for i in range(n)],
                             "x": list(range(n))}), path)
    return path


def test_parquet_read_as_csv_is_one_readable_line(tmp_path):
    path = _parquet(tmp_path / "data.parquet")
    message = _error(path, "csv")
    assert message == (f"cannot read input {path} as csv: CSV parse error: Row #37: Expected 1 "
                       f"columns, got 3; {HINT}")
    assert "PAR1" not in message


def test_jsonl_read_as_parquet(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert _error(path, "parquet") == (
        f"cannot read input {path} as parquet: Parquet magic bytes not found in footer. Either "
        f"the file is corrupted or this is not a parquet file; {HINT}")


@pytest.mark.parametrize("fmt", ["auto", "json"])
def test_a_json_array_file_says_json_lines(tmp_path, fmt):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert _error(path, fmt) == (
        f"cannot read input {path} as json: it is a JSON array, and input.format json reads "
        f"JSON Lines (one object per line); convert it, e.g. jq -c '.[]'")


def test_a_later_bad_file_is_named(tmp_path):
    # The schema comes from the first file; the second fails when its rows are counted.
    (tmp_path / "d").mkdir()
    good = tmp_path / "d" / "a.csv"
    good.write_text("prompt\nhello\n")
    bad = tmp_path / "d" / "b.csv"
    bad.write_bytes(b"prompt\na,b,c\n")
    message = _error(tmp_path / "d", "csv")
    assert message == (f"cannot read input {bad} as csv: CSV parse error: Row #2: Expected 1 "
                       f"columns, got 3; {HINT}")
