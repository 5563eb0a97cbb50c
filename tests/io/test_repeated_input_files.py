"""One input file read twice (listed twice in input.path, matched by two entries, or reached
again through a symlink) ran its rows twice and wrote them twice (helper review); now it is
refused in one line before the model loads (exit 2). Fake engine."""

import os

import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from llmbatch.cli import main


def _run(tmp_path, jobkit, tokenizer_dir, path) -> int:
    job = jobkit.make_job(tokenizer_dir, path, "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return main(["run", "job.yaml", "--progress", "none"])


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inp").mkdir()
    pd.DataFrame({"prompt": ["a b", "c d"]}).to_parquet(tmp_path / "inp" / "x.parquet")
    pd.DataFrame({"prompt": ["e f"]}).to_parquet(tmp_path / "inp" / "y.parquet")
    return tmp_path


@pytest.mark.parametrize("path, named", [
    (["inp/x.parquet", "inp/x.parquet"], "inp/x.parquet twice"),
    (["inp", "inp/y.parquet"], "inp/y.parquet twice"),
    (["inp/*.parquet", "inp/x.parquet"], "inp/x.parquet twice"),
])
def test_a_file_named_twice(inputs, tiny_tokenizer_dir, jobkit, fake_engine_env, capsys,
                            path, named):
    assert _run(inputs, jobkit, tiny_tokenizer_dir, path) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbatch: error: input.path reads ") and named in err, err
    assert err.endswith("its rows would run twice; name each input file once\n")
    assert not (inputs / "out").exists()


def test_a_symlink_to_a_file_of_the_same_folder(inputs, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env, capsys):
    os.symlink(inputs / "inp" / "x.parquet", inputs / "inp" / "z.parquet")
    assert _run(inputs, jobkit, tiny_tokenizer_dir, "inp") == 2
    err = capsys.readouterr().err
    assert f"inp/z.parquet (also as {inputs}/inp/x.parquet) twice" in err, err


def test_distinct_files_run(inputs, tiny_tokenizer_dir, jobkit, fake_engine_env, capsys):
    assert _run(inputs, jobkit, tiny_tokenizer_dir, ["inp/x.parquet", "inp/y.parquet"]) == 0
    assert len(ds.dataset(str(inputs / "out")).to_table()) == 3
    capsys.readouterr()
