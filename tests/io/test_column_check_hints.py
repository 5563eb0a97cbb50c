"""Column checks that say what to do. An input column named `id` given in input.keep_columns
clashes with the output's `id`; the line says to make it the id column (input.id_column: id),
which is what such a job means, not to rename it in the input. Other clashing names keep the
rename hint. A binary prompt column says to store text."""

import pyarrow as pa
import pytest

from llmbatch.io.prompts import check_columns
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError
from llmbatch.jobs.spec import InputSection

SCHEMA = pa.schema([("prompt", pa.string()), ("id", pa.string()), ("error", pa.string())])


@pytest.mark.parametrize("keys, message", [
    (dict(keep_columns=["id"]), "input.keep_columns: 'id' clashes with the output's id column; "
                                "set input.id_column: id to use it as the row id"),
    (dict(keep_columns=["id"], id_column="id"),
     "input.keep_columns: 'id' clashes with the output's id column; remove it there: "
     "input.id_column: id already writes it"),
    (dict(keep_columns=["error"]), "input.keep_columns: 'error' clashes with an output column; "
                                   "rename it in the input"),
])
def test_kept_columns_that_clash(keys, message):
    with pytest.raises(InvalidJobError) as info:
        check_columns(SCHEMA, InputSection(path="x", **keys), [])
    assert info.value.message == message


def test_a_binary_prompt_column_says_what_to_store():
    schema = pa.schema([("prompt", pa.binary())])
    with pytest.raises(InvalidInputError) as info:
        check_columns(schema, InputSection(path="x"), [])
    assert info.value.message == ("input.prompt_column 'prompt' has type binary, expected "
                                  "string (bytes, not text: store the prompts as UTF-8 "
                                  "strings)")
