"""datasets' own progress bars ("Generating train split", ...) and the hub's are off while
input.dataset loads unless the job shows progress: they printed with --progress none. Each
library's setting is restored afterwards, also when the load fails."""

import importlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch.cli import main
from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


def _states():
    import datasets.utils as ds_utils

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    return (ds_utils.are_progress_bars_disabled(), dict(hub_tqdm.progress_bar_states))


def _folder(tmp_path):
    # A fresh data folder: datasets converts it (and shows "Generating train split") once.
    folder = tmp_path / "plain"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), folder / "train.parquet")
    return folder


@pytest.mark.parametrize("progress_bars", [False, True])
def test_bars_only_when_asked_and_settings_restored(tmp_path, capsys, progress_bars):
    before = _states()
    source = open_input(InputSection(dataset=str(_folder(tmp_path))), progress_bars)
    assert source.num_rows == 3
    assert ("Generating train split" in capsys.readouterr().err) == progress_bars
    assert _states() == before


def test_settings_restored_after_a_failed_load_and_a_group_setting_kept(tmp_path):
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    hub_tqdm.disable_progress_bars("huggingface_hub.some_group")   # a caller's own setting
    try:
        before = _states()
        with pytest.raises(InvalidInputError, match='Unknown split "nope"'):
            open_input(InputSection(dataset=str(_folder(tmp_path)), split="nope"))
        assert _states() == before
    finally:
        hub_tqdm.enable_progress_bars("huggingface_hub.some_group")


def test_cli_progress_none_prints_no_dataset_bars(tmp_path, tiny_tokenizer_dir, jobkit,
                                                  fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path)
    job = jobkit.make_job(tiny_tokenizer_dir, None, "out")
    job["input"] = {"dataset": "plain"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    err = capsys.readouterr().err
    assert "Generating" not in err and "%|" not in err
