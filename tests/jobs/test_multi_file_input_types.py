"""A job over several input files runs when a column is all null in the first file, and stops
with one line (exit 2, before the model loads) when files give a column the job reads (kept or
per-row) two types with no common type; such a column the job does not read is no error. The
first case exited 2 with "Unsupported cast from large_string to null ... set input.format", and
ran with the files in the other order. Fake engine."""

import pandas as pd
import pyarrow.dataset as ds
import yaml

from llmbatch.cli import main


def _two_files(tmp_path, column, a_value, b_value) -> None:
    """mixk2/a.parquet and mixk2/b.parquet: one row each, `column` of each value's type."""
    (tmp_path / "mixk2").mkdir()
    pd.DataFrame({"prompt": ["a b"], column: [a_value]}).to_parquet(
        tmp_path / "mixk2" / "a.parquet")
    pd.DataFrame({"prompt": ["c d"], column: [b_value]}).to_parquet(
        tmp_path / "mixk2" / "b.parquet")


def _run(tmp_path, jobkit, tokenizer_dir, **input_keys) -> int:
    job = jobkit.make_job(tokenizer_dir, "mixk2", "out", input=input_keys)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return main(["run", "job.yaml", "--progress", "none"])


def test_null_columns_in_the_first_file(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixk2").mkdir()
    pd.DataFrame({"prompt": ["a b", "c d"], "meta": [None, None]}).to_parquet(
        tmp_path / "mixk2" / "part0.parquet")
    pd.DataFrame({"prompt": [None, "g h"], "meta": ["m1", "m2"]}).to_parquet(
        tmp_path / "mixk2" / "part1.parquet")
    pd.DataFrame({"prompt": [None], "meta": [None]}).to_parquet(
        tmp_path / "mixk2" / "part2.parquet")                  # both columns all null
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir, keep_columns=["meta"]) == 3  # error rows
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [r["meta"] for r in rows] == [None, None, "m1", "m2", None]
    assert [r["error"] for r in rows] == [None, None, "prompt is null", None, "prompt is null"]
    assert rows[3]["output_text"] is not None
    capsys.readouterr()


def test_conflicting_files_exit_2_with_one_line(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _two_files(tmp_path, "meta", 1, "m")
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir, keep_columns=["meta"]) == 2
    folder = tmp_path / "mixk2"
    assert capsys.readouterr().err == (
        f"llmbatch: error: input files disagree on column 'meta': int64 in "
        f"{folder / 'a.parquet'}, large_string in {folder / 'b.parquet'}\n")
    assert not (tmp_path / "out").exists()


def test_a_conflict_in_a_column_the_job_does_not_read_runs(tmp_path, tiny_tokenizer_dir, jobkit,
                                                           fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _two_files(tmp_path, "meta", 1, "m")
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir, keep_columns=[]) == 0
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [(r["id"], r["error"]) for r in rows] == [(0, None), (1, None)]
    assert "meta" not in rows[0]
    capsys.readouterr()


def test_a_conflict_in_a_per_row_column_exits_2(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _two_files(tmp_path, "temperature", 0.5, "hot")
    job = jobkit.make_job(tiny_tokenizer_dir, "mixk2", "out", sampling={"per_row": ["temperature"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none"]) == 2
    folder = tmp_path / "mixk2"
    assert capsys.readouterr().err == (
        f"llmbatch: error: input files disagree on column 'temperature': double in "
        f"{folder / 'a.parquet'}, large_string in {folder / 'b.parquet'}\n")
    assert not (tmp_path / "out").exists()
