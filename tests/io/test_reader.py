"""Input reading: files, globs, directories, lists, URLs, CSV/JSON, datasets; exact row ranges."""


import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


def write_files(tmp_path, sizes, row_group_size=None):
    """Files f0..fN with a global 'n' column numbering rows in order."""
    paths, n = [], 0
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}.parquet"
        pq.write_table(pa.table({"n": list(range(n, n + size)),
                                 "prompt": [f"p{j}" for j in range(n, n + size)]}),
                       path, row_group_size=row_group_size)
        paths.append(str(path))
        n += size
    return paths


def read_range(source, start, end, batch_size=4):
    values = []
    for first, batch in source.iter_batches(start, end, ["n"], batch_size):
        assert first == start + len(values)       # global index of the batch's first row
        assert 0 < batch.num_rows <= batch_size
        values.extend(batch.column(0).to_pylist())
    return values


def test_glob_directory_and_list_agree_and_ranges_are_exact(tmp_path):
    write_files(tmp_path, [5, 0, 9, 3], row_group_size=2)
    (tmp_path / "_ignored.parquet").write_bytes(b"not parquet")
    by_glob = open_input(InputSection(path=str(tmp_path / "f*.parquet")))
    by_dir = open_input(InputSection(path=str(tmp_path)))
    by_list = open_input(InputSection(path=[str(tmp_path / f"f{i}.parquet") for i in range(4)]))
    for source in (by_glob, by_dir, by_list):
        assert source.num_rows == 17
        assert read_range(source, 0, 17) == list(range(17))
        assert read_range(source, 4, 11) == list(range(4, 11))
        assert read_range(source, 16, 17) == [16]
        assert read_range(source, 5, 5) == []


def test_fsspec_urls(tmp_path):
    write_files(tmp_path, [3, 4])
    source = open_input(InputSection(path=f"file://{tmp_path}/f*.parquet"))
    assert read_range(source, 1, 6) == [1, 2, 3, 4, 5]
    import fsspec

    mem = fsspec.filesystem("memory")
    with mem.open("/bucket/in.parquet", "wb") as f:
        pq.write_table(pa.table({"n": [10, 11, 12]}), f)
    assert read_range(open_input(InputSection(path="memory://bucket/in.parquet")), 0, 3) == \
        [10, 11, 12]


def test_csv_and_jsonl(tmp_path):
    pcsv.write_csv(pa.table({"n": [0, 1, 2], "prompt": ["a", "b", "c"]}), tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text('{"n": 0, "prompt": "a"}\n{"n": 1, "prompt": "b"}\n')
    assert read_range(open_input(InputSection(path=str(tmp_path / "x.csv"))), 1, 3) == [1, 2]
    assert read_range(open_input(InputSection(path=str(tmp_path / "y.jsonl"))), 0, 2) == [0, 1]
    with pytest.raises(InvalidInputError, match="mixes formats"):
        open_input(InputSection(path=[str(tmp_path / "x.csv"), str(tmp_path / "y.jsonl")]))


def test_datasets_saved_dir_and_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"n": list(range(10)), "prompt": ["x"] * 10}),
        "test": datasets.Dataset.from_dict({"n": [100, 101], "prompt": ["y"] * 2}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    source = open_input(InputSection(dataset=str(tmp_path / "dd"), split="train"))
    assert source.num_rows == 10 and read_range(source, 3, 8, batch_size=2) == [3, 4, 5, 6, 7]
    assert read_range(open_input(InputSection(dataset=str(tmp_path / "dd"), split="test")),
                      0, 2) == [100, 101]
    with pytest.raises(InvalidInputError, match="input.split 'validation' not in dataset"):
        open_input(InputSection(dataset=str(tmp_path / "dd"), split="validation"))
    # A shuffled view keeps its own row order.
    shuffled = dd["train"].select([9, 0, 5])
    shuffled.save_to_disk(str(tmp_path / "sel"))
    assert read_range(open_input(InputSection(dataset=str(tmp_path / "sel"))), 0, 3) == [9, 0, 5]


def test_datasets_plain_data_folder_by_name(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    pq.write_table(pa.table({"n": [5, 6, 7]}), folder / "train.parquet")
    source = open_input(InputSection(dataset=str(folder), split="train"))
    assert read_range(source, 0, 3) == [5, 6, 7]


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.parquet"), "does not exist"),
    (lambda p: str(p / "nothing-*.parquet"), "no files match"),
    (lambda p: str(p), "holds no parquet/csv/json files"),
])
def test_missing_inputs(tmp_path, make, message):
    with pytest.raises(InvalidInputError, match=message):
        open_input(InputSection(path=make(tmp_path)))


def test_corrupt_parquet_is_an_input_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InvalidInputError, match="cannot read input"):
        source = open_input(InputSection(path=str(tmp_path / "bad.parquet")))
        source.num_rows
