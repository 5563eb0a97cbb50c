"""Damage to an output folder that a helper's review found slipping through (fake engine):
- merge took a committed part holding another row count than its manifest entry records
  (rows silently dropped, or doubled); now it refuses (exit 2), as run and plan already
  noticed and redo such a part;
- a resume took a committed part overwritten by a copy of another valid part of the same row
  count (the folder read some rows twice); the footer's shard / seq / row range is now
  checked against the manifest entry, and the part is produced again;
- output.mode: overwrite of a one-shard job deleted the parts of a shard another run was
  still writing; now it refuses while that shard's lock is held."""

import fcntl
import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

from llmbatch.cli import main


def _setup(tmp_path, jobkit, tokenizer_dir, **output) -> None:
    pd.DataFrame({"prompt": [f"p {i} q" for i in range(20)]}).to_parquet(tmp_path / "inp.parquet")
    job = jobkit.make_job(tokenizer_dir, "inp.parquet", "out",
                          output={"rows_per_part": 7, **output})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))


def _ids(folder) -> list:
    return ds.dataset(str(folder), format="parquet").to_table().column("id").to_pylist()


def test_merge_refuses_a_part_with_another_row_count(tmp_path, tiny_tokenizer_dir, jobkit,
                                                     fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir)
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    part = tmp_path / "out" / "part-00000-00001.parquet"
    whole = pq.read_table(part)
    for keep in (2, 14):          # rows 7..13 written as 2 rows, then as 14 (twice over)
        table = whole.slice(0, 2) if keep == 2 else pa.concat_tables([whole, whole])
        pq.write_table(table, part)
        capsys.readouterr()
        assert main(["merge", "out", "-o", "m.parquet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"llmbatch: error: committed part out/part-00000-00001.parquet holds {keep} rows, its "
                              f"manifest entry records 7;"), err
        assert err.count("\n") == 1
        assert not (tmp_path / "m.parquet").exists()
    # A resume produces the part again, and merge then takes every row once.
    assert main(["run", "job.yaml", "--progress", "none", "--set", "output.mode=resume"]) == 0
    assert main(["merge", "out", "-o", "m.parquet"]) == 0
    assert pq.read_table(tmp_path / "m.parquet").column("id").to_pylist() == list(range(20))


def test_resume_redoes_a_part_overwritten_by_another_valid_part(tmp_path, tiny_tokenizer_dir,
                                                                jobkit, fake_engine_env,
                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir, rows_per_part=5)
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    out = tmp_path / "out"
    shutil.copy(out / "part-00000-00001.parquet", out / "part-00000-00002.parquet")
    assert sorted(_ids(out)) != list(range(20))       # rows 5..9 twice, 10..14 gone
    assert main(["run", "job.yaml", "--progress", "none", "--set", "output.mode=resume"]) == 0
    assert _ids(out) == list(range(20))
    assert "part-00000-00002.parquet" in capsys.readouterr().err   # said what was redone


def test_overwrite_refuses_while_another_shard_runs(tmp_path, tiny_tokenizer_dir, jobkit,
                                                    fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir)
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out" / "_lock-00001", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)     # shard 1 of an earlier 2-shard layout still runs
        os.write(fd, b"4242")
        assert main(["run", "job.yaml", "--progress", "none",
                     "--set", "output.mode=overwrite"]) == 2
        assert capsys.readouterr().err == (
            "llmbatch: error: output.path out: output.mode: overwrite would delete the files "
            "of shard 1 (pid 4242), which a running llmbatch is writing; wait for it to end "
            "or stop it\n")
        assert sorted(os.listdir(tmp_path / "out")) == ["_lock-00001"]
    finally:
        os.close(fd)                       # the run ended: overwrite goes ahead
    assert main(["run", "job.yaml", "--progress", "none", "--set", "output.mode=overwrite"]) == 0
    assert _ids(tmp_path / "out") == list(range(20))


def test_a_hand_edited_manifest_entry_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, jobkit,
                                                         fake_engine_env, monkeypatch, capsys):
    """Valid JSON of the wrong shape in a manifest entry was an internal error (KeyError,
    TypeError: exit 1) in run, plan and merge; a `part` of '../x' read a file outside the
    folder. Now each is an unreadable entry (exit 2, one line), and nothing is deleted."""
    import json

    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir)
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    path = tmp_path / "out" / "_manifest" / "part-00000-00001.json"
    good = json.loads(path.read_text())
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "x.json").write_text("{}")
    edits = {"no row_start": lambda e: e.pop("row_start"),
             "text shard": lambda e: e.update(shard="0"),
             "bool seq": lambda e: e.update(seq=True),
             "null part": lambda e: e.update(part=None),
             "outside part": lambda e: e.update(part="../victim/x.parquet"),
             "reversed rows": lambda e: e.update(row_start=9, row_end=3)}
    for what, edit in [*edits.items(), ("a list", None)]:
        entry = dict(good)
        if edit is None:
            path.write_text(json.dumps([entry]))
        else:
            edit(entry)
            path.write_text(json.dumps(entry))
        files = sorted(os.listdir(tmp_path / "out"))
        for argv in (["run", "job.yaml", "--progress", "none", "--set", "output.mode=resume"],
                     ["plan", "job.yaml", "--set", "output.mode=resume"],
                     ["merge", "out", "-o", "m.parquet"]):
            capsys.readouterr()
            assert main(argv) == 2, (what, argv)
            err = capsys.readouterr().err
            assert "unreadable manifest entry part-00000-00001.json" in err and \
                err.count("\n") == 1, (what, argv, err)
        assert sorted(os.listdir(tmp_path / "out")) == files, what
    assert (tmp_path / "victim" / "x.json").exists()
    path.write_text(json.dumps(good))
    assert main(["merge", "out", "-o", "m.parquet"]) == 0


def test_parts_of_shards_the_job_never_writes_are_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                          fake_engine_env, monkeypatch, capsys):
    """A 4-shard run, its manifest deleted, resumed as one shard: shards 1-3's parts stayed
    and the folder read 35 rows for 20. Now a run that would keep them refuses (exit 2);
    overwrite deletes them."""
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir, rows_per_part=3)
    for index in range(4):
        assert main(["run", "job.yaml", "--progress", "none", "--set", f"shard.index={index}",
                     "--set", "shard.count=4"]) == 0
    shutil.rmtree(tmp_path / "out" / "_manifest")
    for mode in ("resume", "error"):
        capsys.readouterr()
        assert main(["run", "job.yaml", "--progress", "none", "--set",
                     f"output.mode={mode}"]) == 2
        assert capsys.readouterr().err == (
            "llmbatch: error: output.path out holds part-00001-00000.parquet and 5 more: parts "
            "of a shard index >= 1, which a job of 1 shard never writes, so readers would take "
            "their rows as this job's; set output.mode: overwrite (it deletes them) or remove "
            "them\n")
    assert main(["run", "job.yaml", "--progress", "none", "--set", "output.mode=overwrite"]) == 0
    assert _ids(tmp_path / "out") == list(range(20))


def test_a_missing_middle_manifest_entry_is_named_before_the_model_loads(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch, capsys):
    """It named the part after the gap ('not contiguous at part part-00000-00002'), and only
    after the model had loaded (Manifest.recover); plan said nothing."""
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, jobkit, tiny_tokenizer_dir)
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    middle = tmp_path / "out" / "_manifest" / "part-00000-00001.json"
    kept = middle.read_text()
    middle.unlink()
    want = (f"llmbatch: error: output.path {tmp_path / 'out'}: manifest of shard 0 is not "
            "contiguous: the "
            "manifest entry of part part-00000-00001.parquet is missing (the next is "
            "part-00000-00002.parquet); set output.mode: overwrite\n")
    monkeypatch.setenv("LLMBATCH_ENGINE_FACTORY", "no_such_module:factory")   # never reached
    for command in (["run", "job.yaml", "--progress", "none"], ["plan", "job.yaml"]):
        capsys.readouterr()
        assert main(command) == 2
        assert capsys.readouterr().err == want
    # An entry whose rows do not follow on from the one before it.
    middle.write_text(kept)
    last = tmp_path / "out" / "_manifest" / "part-00000-00002.json"
    last.write_text(last.read_text().replace('"row_start": 14', '"row_start": 15'))
    capsys.readouterr()
    assert main(["plan", "job.yaml"]) == 2
    assert "not contiguous: part part-00000-00002.parquet starts at row 15, where row 14 was " \
           "due;" in capsys.readouterr().err
