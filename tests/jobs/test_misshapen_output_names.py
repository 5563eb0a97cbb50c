"""A name llmbatch writes in output.path, there as the other kind of thing (a file named
_manifest or _stats, a folder named _lock-00000), was an internal error (exit 1) after all the
work: FileExistsError when the first part committed or the stats were written,
IsADirectoryError on the lock. Now the run refuses before the model loads (exit 2, one line)
and leaves the folder as it was."""

import os

import pandas as pd
import pytest
import yaml

from llmbatch.cli import main


@pytest.mark.parametrize("name,kind,said", [
    ("_manifest", "file", "_manifest is not a folder"),
    ("_stats", "file", "_stats is not a folder"),
    ("_lock-00000", "dir", "_lock-00000 is a folder, not a lock file"),
    ("_lock-00003", "dir", "_lock-00003 is a folder, not a lock file"),
])
def test_misshapen_own_names_are_refused_up_front(name, kind, said, tmp_path, tiny_tokenizer_dir,
                                                  jobkit, fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"prompt": ["a b", "c d"]}).to_parquet(tmp_path / "inp.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        jobkit.make_job(tiny_tokenizer_dir, "inp.parquet", "out")))
    os.makedirs(tmp_path / "out")
    if kind == "file":
        (tmp_path / "out" / name).write_text("x")
    else:
        os.makedirs(tmp_path / "out" / name)
    for command in (["run", "job.yaml", "--progress", "none"], ["plan", "job.yaml"]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == (f"llmbatch: error: output.path out: {said} (llmbatch writes it); move it "
                       f"away or use another output.path\n"), err
        assert sorted(os.listdir(tmp_path / "out")) == [name]
    # Moved away, the job runs.
    target = tmp_path / "out" / name
    target.unlink() if kind == "file" else target.rmdir()
    assert main(["run", "job.yaml", "--progress", "none"]) == 0


def test_a_dangling_symlink_output_path(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                        monkeypatch, capsys):
    """It was "File exists" (exit 1) from makedirs after the model loaded."""
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"prompt": ["a b"]}).to_parquet(tmp_path / "inp.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        jobkit.make_job(tiny_tokenizer_dir, "inp.parquet", "out")))
    os.symlink(tmp_path / "gone", tmp_path / "out")
    assert main(["run", "job.yaml", "--progress", "none"]) == 2
    assert capsys.readouterr().err == (f"llmbatch: error: output.path out is a symlink to "
                                       f"{tmp_path / 'gone'}, which does not exist; create it "
                                       f"or use another output.path\n")
    os.mkdir(tmp_path / "gone")
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    assert any(name.startswith("part-") for name in os.listdir(tmp_path / "gone"))
