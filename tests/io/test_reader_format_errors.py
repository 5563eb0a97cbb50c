"""An input file pyarrow cannot read is one readable line naming the file, exit 2.

A file read in the wrong input.format names the format tried and input.format: a Parquet file
read as CSV printed binary bytes; a JSON array file said only "Column() changed from object to
array". A read error that is no format problem does not point at input.format: a truncated or
damaged Parquet file says so; an unreadable or vanished file gives the operating system's
reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.cli import main
from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection

HINT = "set input.format (parquet | csv | json) to the file's format"


def _error(path, fmt="auto") -> str:
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
    # The schema comes from the first file; the second fails when its rows are counted. It is
    # text read as CSV: a bad row, not a format problem, so no input.format hint.
    (tmp_path / "d").mkdir()
    good = tmp_path / "d" / "a.csv"
    good.write_text("prompt\nhello\n")
    bad = tmp_path / "d" / "b.csv"
    bad.write_bytes(b"prompt\na,b,c\n")
    message = _error(tmp_path / "d", "csv")
    assert message == (f"cannot read input {bad} as csv: CSV parse error: Row #2: Expected 1 "
                       f"columns, got 3")


def _parquet_bytes(tmp_path, n=2000) -> bytes:
    return _parquet(tmp_path / "whole.parquet", n).read_bytes()


def test_truncated_parquet_file(tmp_path):
    path = tmp_path / "cut.parquet"
    path.write_bytes(_parquet_bytes(tmp_path)[:-100])     # a copy cut short
    assert _error(path) == (f"cannot read input {path} as parquet: the file is damaged or "
                            f"truncated (it begins as Parquet but has no Parquet footer at its "
                            f"end)")


def test_parquet_footer_damaged(tmp_path):
    data = bytearray(_parquet_bytes(tmp_path))
    footer = int.from_bytes(data[-8:-4], "little")      # the footer's length, then "PAR1"
    data[-8 - footer:-8] = b"\xab" * footer
    path = tmp_path / "footer.parquet"
    path.write_bytes(bytes(data))
    message = _error(path, "parquet")
    assert message.startswith(f"cannot read input {path} as parquet: the file is damaged or "
                              f"truncated (Couldn't deserialize thrift")
    assert HINT not in message


def test_parquet_page_damaged_is_named_when_its_rows_are_read(tmp_path):
    # The footer is intact (rows are counted), the first data pages are not.
    data = bytearray(_parquet_bytes(tmp_path))
    data[10:2000] = b"\x11" * 1990
    path = tmp_path / "pages.parquet"
    path.write_bytes(bytes(data))
    message = _error(path)
    assert message.startswith(f"cannot read input {path} as parquet: the file is damaged or "
                              f"truncated (")
    assert HINT not in message


def test_file_gone_after_it_was_listed(tmp_path):
    path = tmp_path / "gone.parquet"
    path.write_bytes(_parquet_bytes(tmp_path, 5))
    source = open_input(InputSection(path=str(path)))
    path.unlink()
    with pytest.raises(InvalidInputError) as info:
        source.num_rows
    assert info.value.message == f"cannot read input {path}: No such file or directory"


def test_permission_denied(monkeypatch, tmp_path):
    # Tests run as root here, where chmod 000 does not stop a read: an fsspec file system
    # refuses instead, as a local one does for another user.
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.pipe("/llmbatch-test-denied/a.parquet", _parquet_bytes(tmp_path, 5))

    def refuse(self, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(MemoryFileSystem, "_open", refuse)
    try:
        assert _error("memory://llmbatch-test-denied/a.parquet") == (
            "cannot read input /llmbatch-test-denied/a.parquet: Permission denied")
    finally:
        fs.rm("/llmbatch-test-denied", recursive=True)


def test_empty_parquet_file_says_empty(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    assert _error(path) == f"cannot read input {path} as parquet: Parquet file size is 0 bytes"


@pytest.mark.parametrize("name, content, fmt, hint", [
    ("rows.csv", "prompt\nhello\n", "json", True),             # CSV text read as JSON Lines
    ("rows.parquet", "prompt\nhello\n", "auto", True),         # text named .parquet
    ("rows.jsonl", '{"prompt": "a"}\n{"prompt": \n', "auto", False),  # a bad JSON Lines row
])
def test_hint_only_where_the_bytes_may_be_another_format(tmp_path, name, content, fmt, hint):
    path = tmp_path / name
    path.write_text(content)
    message = _error(path, fmt)
    assert message.endswith(f"; {HINT}") == hint


def test_cli_truncated_parquet_exit_2_one_line(tmp_path, tiny_tokenizer_dir, jobkit,
                                               fake_engine_env, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.parquet").write_bytes(_parquet_bytes(tmp_path)[:-100])
    job = jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml"]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: cannot read input {tmp_path / 'in.parquet'} as parquet: the file is "
        f"damaged or truncated (it begins as Parquet but has no Parquet footer at its end)\n")
    assert not (tmp_path / "out").exists()
