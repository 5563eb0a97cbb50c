"""Input files whose bytes pyarrow hands over undecoded are one input error (exit 2) naming the
file, not an internal error. A CSV header in latin-1 ('café') ended the job as 'internal error:
UnicodeDecodeError' (exit 1) when the column names were first read. A zstd-compressed file
(.csv.zst, .jsonl.zst: the reader takes the extension, pyarrow's datasets do not decompress it)
was read as its compressed bytes: the CSV one as an internal error, the JSON one as a parse
error hinting at input.format."""

import gzip

import pyarrow as pa
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


def _error(path) -> str:
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(path=str(path)))
    return info.value.message


def test_csv_header_not_utf8(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"prompt,caf\xe9\nhello,x\n")
    assert _error(path) == (f"cannot read input {path} as csv: a column name is not valid "
                            f"UTF-8 (byte 0xe9 at position 3); convert the file to UTF-8")


def test_the_second_file_of_a_folder_is_named(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"prompt\nhello\n")
    (tmp_path / "b.csv").write_bytes(b"prompt,\xff\nhello,x\n")
    assert _error(tmp_path) == (f"cannot read input {tmp_path / 'b.csv'} as csv: a column name "
                                f"is not valid UTF-8 (byte 0xff at position 0); convert the "
                                f"file to UTF-8")


@pytest.mark.parametrize("name", ["in.csv.zst", "in.jsonl.zst"])
def test_zstd_files_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    with pa.CompressedOutputStream(pa.OSFile(str(path), "wb"), "zstd") as f:
        f.write(b"prompt\nhello\n" if ".csv" in name else b'{"prompt": "hello"}\n')
    assert _error(path) == (f"input.path: {path} is zstd-compressed, which the input reader "
                            f"does not decompress (gzip and bzip2 it does); decompress it "
                            f"(zstd -d) or use .gz")


def test_gzip_still_reads(tmp_path):
    path = tmp_path / "in.csv.gz"
    path.write_bytes(gzip.compress(b"prompt\nhello\n"))
    assert open_input(InputSection(path=str(path))).num_rows == 1
