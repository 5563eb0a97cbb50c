"""An output.path that cannot become a writable directory is an invalid job (exit 2, one line),
found before the model loads, never an internal error after it."""

import os
import sys

import pytest

from llmbatch import run_job
from llmbatch.cli import main
from llmbatch.jobs.errors import EXIT_INVALID, InvalidJobError
from llmbatch.jobs.fake_engine import FakeEngine


@pytest.fixture
def counted_engine():
    """An engine factory that records how often it was called."""
    calls = []

    def factory(config):
        calls.append(config)
        return FakeEngine(config)

    factory.calls = calls
    return factory


def test_output_path_below_a_file_fails_before_the_model_loads(tmp_path, tiny_tokenizer_dir,
                                                               jobkit, counted_engine):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(blocker / "out"))
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=counted_engine)
    assert info.value.message == f"output.path {blocker / 'out'}: {blocker} is not a directory"
    assert info.value.exit_code == EXIT_INVALID
    assert counted_engine.calls == []
    assert blocker.read_text() == "not a folder"


def test_output_path_deeper_below_a_file_names_the_file(tmp_path, tiny_tokenizer_dir, jobkit,
                                                        counted_engine):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    (tmp_path / "f").write_text("x")
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "f" / "a" / "b"))
    with pytest.raises(InvalidJobError, match=r": .*/f is not a directory$"):
        run_job(job, engine_factory=counted_engine)
    assert counted_engine.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_uncreatable_output_path_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, jobkit,
                                                    fake_engine_env, capsys):
    # /proc refuses new folders (ENOENT) even to root, whom os.access lets through.
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    out = f"/proc/llmbatch-test-{os.getpid()}"
    job_path = tmp_path / "job.yaml"
    import yaml

    job_path.write_text(yaml.safe_dump(jobkit.make_job(tiny_tokenizer_dir, inp, out)))
    code = main(["run", str(job_path), "--progress", "none"])
    _, err = capsys.readouterr()
    assert code == EXIT_INVALID
    assert err.count("\n") == 1
    assert err.startswith(f"llmbatch: error: output.path {out}: ")
    assert not os.path.exists(out)


@pytest.mark.parametrize("mode", ["overwrite", "resume", "error"])
def test_foreign_data_in_the_output_folder_refuses_and_is_kept(tmp_path, tiny_tokenizer_dir,
                                                               jobkit, fake_engine_env,
                                                               counted_engine, capsys, mode):
    # A Spark part file: overwrite used to delete it (any name starting "part-" was ours).
    import yaml

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    out = tmp_path / "out"
    run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(out)))
    spark = out / "part-00000-0f1c9a2e-77b1-4a53-9d1e-3c2f.snappy.parquet"
    spark.write_bytes(b"spark rows")
    before = sorted(os.listdir(out))
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(out), output={"mode": mode})
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=counted_engine)
    assert info.value.message == (f"output.path {out} holds {spark.name}, not written by "
                                  f"llmbatch; readers of the folder would mix it with the "
                                  f"results: move it away or use another output.path")
    assert info.value.exit_code == EXIT_INVALID and counted_engine.calls == []
    assert sorted(os.listdir(out)) == before and spark.read_bytes() == b"spark rows"
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    assert main(["run", str(job_path), "--progress", "none"]) == EXIT_INVALID
    assert capsys.readouterr().err == f"llmbatch: error: {info.value.message}\n"


def test_overwrite_keeps_hidden_foreign_files(tmp_path, tiny_tokenizer_dir, jobkit,
                                              fake_engine_env):
    # A user's _stats/README used to go with the whole _stats/ folder.
    import pyarrow.dataset as ds

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6)
    out = tmp_path / "out"
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(out), output={"rows_per_part": 4})
    run_job(job)
    for name in ("_stats/README", "_manifest/NOTES", "_SUCCESS", ".hidden"):
        (out / name).write_text(name)
    result = run_job(job, output={"mode": "overwrite", "rows_per_part": 3})
    assert result.num_rows_skipped == 0 and result.exit_code == 0
    assert sorted(os.listdir(out)) == [".hidden", "_SUCCESS", "_lock-00000", "_manifest",
                                       "_stats", "part-00000-00000.parquet",
                                       "part-00000-00001.parquet"]
    assert sorted(os.listdir(out / "_stats")) == ["README", "stats-00000-000.parquet"]
    assert sorted(os.listdir(out / "_manifest")) == ["NOTES", "part-00000-00000.json",
                                                     "part-00000-00001.json"]
    assert (out / "_stats" / "README").read_text() == "_stats/README"
    assert ds.dataset(str(out)).to_table().column("id").to_pylist() == list(range(6))
