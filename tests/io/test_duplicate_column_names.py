"""A Parquet file with two columns of one name (pyarrow writes such files; no reader takes them
as a table) is named as such, like a CSV or JSON Lines file with a repeated column: it read
'the file is damaged or truncated (Can't unify schema with duplicate field names)', which sent
the user looking for a broken copy."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


def test_parquet_with_a_repeated_column_name(tmp_path):
    path = str(tmp_path / "dup.parquet")
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array([1]), pa.array(["b"])],
                                 names=["prompt", "n", "prompt"])
    pq.write_table(table, path)
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(path=path))
    assert info.value.message == (f"cannot read input {path} as parquet: it has more than one "
                                  f"column named 'prompt'; give each column its own name")
