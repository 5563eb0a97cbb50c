"""A reader that goes away does not change a run. `llmbatch run job.yaml | head -1`: the job
had finished (parts and stats on disk), but click made the broken pipe on stdout a silent exit
1, which the contract reads as an internal error. `llmbatch run job.yaml 2>&1 | head -3`: the
next progress line on the closed stderr killed the job (BrokenPipeError, exit 1, no part
written); progress is for the reader, not a reason to stop. The same with the descriptor
closed from the start (`>&-`, `2>&-`: EBADF instead of EPIPE)."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch import run_job


def _write_job(tmp_path, jobkit, tokenizer_dir) -> str:
    """A 5-row job for the fake engine, writing tmp_path/out; returns the job file's path."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(jobkit.make_job(tokenizer_dir, inp, str(tmp_path / "out"))))
    return str(job)


def _cli_with_stream_gone(stream: str, *argv, closed=False):
    """Run `llmbatch *argv` with `stream` ("stdout" or "stderr") on a pipe whose reader is
    closed, or (`closed`) with that descriptor closed from the start (`>&-`, `2>&-`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)                   # the reader is gone before anything is printed
    other = subprocess.PIPE
    fd = 1 if stream == "stdout" else 2
    try:
        return subprocess.run([sys.executable, "-m", "llmbatch.cli", *argv],
                              stdout=write_end if stream == "stdout" else other,
                              stderr=write_end if stream == "stderr" else other,
                              preexec_fn=(lambda: os.close(fd)) if closed else None,
                              text=True, timeout=120)
    finally:
        os.close(write_end)


def _closed_pipe_run(tmp_path, jobkit, tokenizer_dir, stream: str, *args, closed=False):
    """`llmbatch run` of a fresh 5-row job with `stream` gone (_cli_with_stream_gone)."""
    job = _write_job(tmp_path, jobkit, tokenizer_dir)
    return _cli_with_stream_gone(stream, "run", job, *args, closed=closed)


@pytest.mark.parametrize("closed", [False, True])
def test_run_exit_code_survives_a_closed_stdout(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env, closed):
    proc = _closed_pipe_run(tmp_path, jobkit, tiny_tokenizer_dir, "stdout", "--progress", "none",
                            closed=closed)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert any(name.startswith("part-") for name in os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("closed", [False, True])
def test_run_goes_on_when_its_stderr_reader_is_gone(tmp_path, tiny_tokenizer_dir, jobkit,
                                                    fake_engine_env, closed):
    for progress in ("log", "bar"):
        proc = _closed_pipe_run(tmp_path, jobkit, tiny_tokenizer_dir, "stderr", "--progress",
                                progress, "--log-every", "0", "--set", "output.mode=overwrite",
                                closed=closed)
        assert proc.returncode == 0, progress
        assert proc.stdout.startswith("shard 0/1: 5 rows (5 ok, 0 error, 0 resumed)")


# The other commands print their result on stdout too, and a reader gone before it (`llmbatch
# plan job.yaml | head -0`) made each a silent exit 1: click turns EPIPE into sys.exit(1).
@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_exit_0_when_stdout_is_gone(tmp_path, tiny_tokenizer_dir, jobkit,
                                                      fake_engine_env, command, closed):
    job = _write_job(tmp_path, jobkit, tiny_tokenizer_dir)
    proc = _cli_with_stream_gone("stdout", command, job, closed=closed)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.fixture
def finished_job(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    """tmp_path/out holding a finished 5-row job (parts, manifest, stats)."""
    job = _write_job(tmp_path, jobkit, tiny_tokenizer_dir)
    assert run_job(job).exit_code == 0
    return str(tmp_path / "out")


@pytest.mark.parametrize("closed", [False, True])
def test_stats_exits_0_when_stdout_is_gone(finished_job, closed):
    proc = _cli_with_stream_gone("stdout", "stats", finished_job, closed=closed)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("closed", [False, True])
def test_merge_writes_and_exits_0_when_stdout_is_gone(finished_job, tmp_path, closed):
    dest = str(tmp_path / "all.parquet")
    proc = _cli_with_stream_gone("stdout", "merge", finished_job, "-o", dest, closed=closed)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert pq.read_table(dest).column("id").to_pylist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("argv, code", [(["run", "/nonexistent/job.yaml"], 2),
                                        (["bogus"], 2), (["validate", os.devnull], 2)])
def test_the_error_line_on_a_gone_stderr_keeps_the_exit_code(argv, code, closed):
    """The closing error line itself was written with click.echo: on a closed stderr it
    raised inside the handler and every code (2, 130, 143) became 1."""
    proc = _cli_with_stream_gone("stderr", *argv, closed=closed)
    assert proc.returncode == code, proc.stdout
