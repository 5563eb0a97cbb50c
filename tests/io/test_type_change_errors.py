"""A type problem found while reading names the column, its types and the file(s), in one line
(exit 2), without pointing at input.format: a value that does not fit the type the input files
share (it read as a damaged file), a JSON Lines column whose type changes inside one file (it
said "Column(/x) changed from number to string in row N", N counting from a block, not the
file)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection


def _error(path, columns=("x",)) -> str:
    with pytest.raises(InvalidInputError) as info:
        source = open_input(InputSection(path=str(path)))
        for _ in source.iter_batches(0, source.num_rows, list(columns), 1024):
            pass
    assert info.value.exit_code == EXIT_INVALID
    assert "\n" not in info.value.message and "input.format" not in info.value.message
    return info.value.message


def test_a_value_the_merged_type_cannot_hold_exactly_is_refused_not_rounded(tmp_path):
    pq.write_table(pa.table({"x": [1.5]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": [2**53 + 1]}), tmp_path / "b.parquet")
    assert _error(tmp_path) == (
        f"input files disagree on column 'x': double in {tmp_path / 'a.parquet'}, int64 in "
        f"{tmp_path / 'b.parquet'}, whose values do not all fit double (Integer value "
        f"9007199254740993 not in range: -9007199254740992 to 9007199254740992)")


@pytest.mark.parametrize("rows_before", [3, 200_000])   # inside the first block, and after it
def test_a_jsonl_column_that_changes_type_in_one_file(tmp_path, rows_before):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"prompt": "p", "x": {i}}}\n' for i in range(rows_before))
                    + '{"prompt": "p", "x": "seven"}\n')
    assert _error(path) == (f"input file {path}: column 'x' changes from number to string "
                            f"part-way through the file; give the column one type in every row")


def test_a_nested_jsonl_field_is_named_by_its_path(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"m": [{"role": "user", "content": "a"}]}\n'
                    '{"m": [{"role": "user", "content": 3}]}\n')
    assert _error(path, ["m"]) == (f"input file {path}: column 'm[].content' changes from string "
                                   f"to number part-way through the file; give the column one "
                                   f"type in every row")
