"""input.split on a saved single Dataset (save_to_disk of a Dataset, not a DatasetDict): it
holds no splits, and input.split was silently ignored there (every row ran, and the plan said
"ds_single[test]"). A split given in the job that the Dataset was not saved as is refused in
one line (exit 2); the default still reads it all, and the description claims no split that
was not applied, nor does `llmbatch validate` (it printed "split: train" for any job)."""

import pytest
import yaml

from llmbatch.cli import main
from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """ds_single: a Dataset with no split attribute; ds_test: one saved from a 'test' split;
    ds_dict: a DatasetDict with a train split."""
    import datasets

    root = tmp_path_factory.mktemp("single")
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]}).save_to_disk(str(root / "ds_single"))
    datasets.Dataset.from_dict({"prompt": ["x", "y"]}, split="test").save_to_disk(
        str(root / "ds_test"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["t"]})}).save_to_disk(
        str(root / "ds_dict"))
    return root


def _open(path, **split):
    source = open_input(InputSection(dataset=str(path), **split))
    return source.num_rows, source.description


def _refused(path, split) -> str:
    with pytest.raises(InvalidInputError) as info:
        _open(path, split=split)
    assert info.value.exit_code == EXIT_INVALID
    return info.value.message


def test_the_default_split_reads_the_whole_dataset(saved):
    assert _open(saved / "ds_single") == (3, str(saved / "ds_single"))
    assert _open(saved / "ds_test") == (2, f"{saved / 'ds_test'}[test]")   # its own split


def test_a_split_the_dataset_was_saved_as_is_accepted(saved):
    assert _open(saved / "ds_test", split="test") == (2, f"{saved / 'ds_test'}[test]")
    # "train" is the default: spelled out (README's example, `llmbatch validate`'s output) it
    # still reads a Dataset saved without a split name, and claims no split.
    assert _open(saved / "ds_single", split="train") == (3, str(saved / "ds_single"))


def test_another_split_is_refused(saved):
    assert _refused(saved / "ds_single", "test") == (
        f"input.split 'test': input.dataset {saved / 'ds_single'} is a single saved Dataset "
        f"without splits; remove input.split to read all of it")
    assert _refused(saved / "ds_test", "train") == (
        f"input.split 'train': input.dataset {saved / 'ds_test'} is a single saved Dataset "
        f"without splits (its split attribute is 'test'); remove input.split to read all of it")


@pytest.mark.parametrize("split, out, code", [
    (None, "input: ds_single (3 rows)\n", 0),
    ("test", "", 2),
])
def test_cli_plan(saved, tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch,
                  capsys, split, out, code):
    monkeypatch.chdir(saved)
    job = jobkit.make_job(tiny_tokenizer_dir, None, str(tmp_path / "out"))
    job["input"] = {"dataset": "ds_single"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    sets = ["--set", f"input.split={split}"] if split else []
    assert main(["plan", str(tmp_path / "job.yaml"), *sets]) == code
    captured = capsys.readouterr()
    assert captured.out.startswith(out)
    if code:
        assert captured.err == ("llmbatch: error: input.split 'test': input.dataset ds_single is "
                                "a single saved Dataset without splits; remove input.split to "
                                "read all of it\n")


@pytest.mark.parametrize("source, sets, shown", [
    ({"dataset": "ds_test"}, [], None),            # read whole: no split applied
    ({"dataset": "ds_single"}, [], None),
    ({"dataset": "ds_test"}, ["--set", "input.split=test"], "test"),   # set in the job
    ({"dataset": "ds_dict"}, [], "train"),         # the default picks ds_dict's train split
    ({"path": "rows.parquet"}, [], None),          # files have no splits
])
def test_cli_validate_shows_a_split_only_when_set_or_applied(
        saved, tmp_path, tiny_tokenizer_dir, jobkit, monkeypatch, capsys, source, sets, shown):
    monkeypatch.chdir(saved)
    job = jobkit.make_job(tiny_tokenizer_dir, None, str(tmp_path / "out"))
    job["input"] = source
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "job.yaml"), *sets]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["input"].get("split") == shown
