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
