"""input.dataset edge cases a review helper found:
- a saved DatasetDict with one empty split could not be read at all, its other splits included
  (datasets cannot reload an empty saved Dataset: "IndexError: list index out of range"); now
  the split the job reads is loaded alone, and an empty one is a 0-row input;
- an fsspec URL (file://, memory://) was "no such local directory" even for a saved dataset
  that exists; load_from_disk reads it through fsspec;
- two loads in threads restored each other's process-wide settings (the hub's progress bars
  stayed off after both ended); loads now take turns."""

import threading

import pytest

from llmbatch.io import hub_datasets
from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("dicts")
    full = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "n": [1, 2, 3]})
    datasets.DatasetDict({"train": full, "test": full.select([])}).save_to_disk(
        str(root / "dict"))
    full.save_to_disk(str(root / "single"))
    return root


def _read(dataset, **split):
    source = open_input(InputSection(dataset=str(dataset), **split))
    rows = [r for _, b in source.iter_batches(0, source.num_rows, ["prompt"], 2)
            for r in b.column("prompt").to_pylist()]
    return rows, source.description, source.schema


def test_the_full_split_of_a_dict_with_an_empty_one(folder):
    rows, description, _ = _read(folder / "dict")
    assert rows == ["a", "b", "c"] and description == f"{folder / 'dict'}[train]"


def test_an_empty_split_is_a_zero_row_input_with_its_columns(folder):
    rows, _, schema = _read(folder / "dict", split="test")
    assert rows == [] and schema.names == ["prompt", "n"]


def test_a_split_the_dict_lacks_names_the_splits(folder):
    with pytest.raises(InvalidInputError) as info:
        _read(folder / "dict", split="validation")
    assert info.value.message == (f"input.split 'validation' not in dataset {folder / 'dict'} "
                                  f"(splits: train, test)")


def test_a_file_url_to_a_saved_dataset(folder):
    rows, description, _ = _read(f"file://{folder / 'single'}")
    assert rows == ["a", "b", "c"] and description == f"file://{folder / 'single'}"
    rows, _, _ = _read(f"file://{folder / 'dict'}", split="train")
    assert rows == ["a", "b", "c"]
    with pytest.raises(InvalidInputError) as info:
        _read(f"file://{folder / 'nothing'}")
    assert info.value.message.startswith(f"input.dataset file://{folder / 'nothing'}: not a "
                                         f"dataset saved with save_to_disk (")


def test_a_memory_url_to_a_saved_dataset():
    import datasets

    datasets.Dataset.from_dict({"prompt": ["m1", "m2"]}).save_to_disk("memory://llmbatch-saved")
    assert _read("memory://llmbatch-saved")[0] == ["m1", "m2"]


def test_loads_in_threads_take_turns(monkeypatch, folder):
    inside, overlap = [], []

    def slow_load(name, split, split_set):
        overlap.append(bool(inside))
        inside.append(1)
        threading.Event().wait(0.2)
        inside.pop()
        return None, name

    monkeypatch.setattr(hub_datasets, "_load_dataset_table", slow_load)
    threads = [threading.Thread(target=hub_datasets.load_dataset_table, args=("x", "train"))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [False, False, False]


def test_an_empty_saved_single_dataset_is_a_zero_row_input(tmp_path):
    import datasets

    empty = datasets.Dataset.from_dict({"prompt": ["a"], "n": [1]}).select([])
    empty.save_to_disk(str(tmp_path / "empty"))
    rows, description, schema = _read(tmp_path / "empty")
    assert rows == [] and description == str(tmp_path / "empty")
    assert schema.names == ["prompt", "n"]
    with pytest.raises(InvalidInputError, match="is a single saved Dataset without splits"):
        _read(tmp_path / "empty", split="test")


def test_an_empty_saved_single_dataset_by_url(tmp_path):
    """Only the local-path branch read an empty saved Dataset; by file:// URL it was
    'not a dataset saved with save_to_disk (IndexError...)'."""
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a"]}).select([]).save_to_disk(str(tmp_path / "e"))
    rows, _, schema = _read(f"file://{tmp_path / 'e'}")
    assert rows == [] and schema.names == ["prompt"]
