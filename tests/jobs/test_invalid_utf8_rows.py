"""Text that is not valid UTF-8 is that row's error, not the job's. pyarrow's JSON reader (and a
Parquet string column written without validation) keeps such bytes in a string column; the
first Python read of the batch raised UnicodeDecodeError, and the whole job ended as 'engine
failed: UnicodeDecodeError ...' (exit 1) with nothing written, the other rows lost."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import RowError


def _unchecked_strings(values: list) -> pa.Array:
    """A string array holding these bytes as they are (no UTF-8 validation)."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


@pytest.mark.parametrize("name, data", [
    ("in.jsonl", b'{"prompt": "hi cat"}\n{"prompt": "caf\xe9"}\n{"prompt": "the dog"}\n'),
    # pyarrow's CSV reader refused such a file whole: a latin-1 row in the first block typed
    # the column binary ('has type binary'); one in a later block stopped the job mid-run
    # ('CSV conversion error to string: invalid UTF8 data').
    ("in.csv", b"prompt\nhi cat\ncaf\xe9\nthe dog\n"),
])
def test_a_prompt_not_utf8_is_one_error_row(tmp_path, tiny_tokenizer_dir, jobkit,
                                            fake_engine_env, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, str(path), out))
    assert (result.num_rows_ok, result.num_rows_error, result.exit_code) == (2, 1, 3)
    rows = ds.dataset(out).to_table().select(["id", "finish_reason", "error"]).to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["finish_reason"] == "error" for r in rows] == [False, True, False]
    assert rows[1]["error"] == ("input column 'prompt' is not valid UTF-8 "
                                "(byte 0xe9 at position 3)")


def test_kept_and_id_columns_not_utf8(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a b", "c d", "e f"],
                             "key": _unchecked_strings([b"k0", b"k\xff1", b"k2"]),
                             "note": _unchecked_strings([b"ok", b"ok", b"\xc3"])}), path)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, path, out,
                                     input={"id_column": "key", "keep_columns": ["note"]}))
    assert (result.num_rows_ok, result.num_rows_error) == (1, 2)
    table = ds.dataset(out).to_table()
    # The undecodable bytes are shown replaced, so the row can be found and written.
    assert table.column("id").to_pylist() == ["k0", "k\ufffd1", "k2"]
    assert table.column("note").to_pylist() == ["ok", "ok", "\ufffd"]
    assert table.column("error").to_pylist() == [
        None, "input column 'key' is not valid UTF-8 (byte 0xff at position 1)",
        "input column 'note' is not valid UTF-8 (byte 0xc3 at position 0)"]


def test_on_row_error_fail_names_the_row(tmp_path, tiny_tokenizer_dir, jobkit,
                                         fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": _unchecked_strings([b"a b", b"\xe9"])}), path)
    with pytest.raises(RowError, match=r"^row 1: input column 'prompt' is not valid UTF-8 "
                                       r"\(byte 0xe9 at position 0\) \(on_row_error: fail\)$"):
        run_job(jobkit.make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                                on_row_error="fail"))

