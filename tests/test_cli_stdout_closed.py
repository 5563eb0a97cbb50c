"""A reader that goes away does not change a run. `llmbatch run job.yaml | head -1`: the job
had finished (parts and stats on disk), but click made the broken pipe on stdout a silent exit
1, which the contract reads as an internal error. `llmbatch run job.yaml 2>&1 | head -3`: the
next progress line on the closed stderr killed the job (BrokenPipeError, exit 1, no part
written); progress is for the reader, not a reason to stop. The same with the descriptor
closed from the start (`>&-`, `2>&-`: EBADF instead of EPIPE)."""

import os
import subprocess
import sys

import pytest
import yaml


def _closed_pipe_run(tmp_path, jobkit, tokenizer_dir, stream: str, *args, closed=False):
    """Run the CLI with `stream` ("stdout" or "stderr") on a pipe whose reader is closed, or
    (`closed`) with that descriptor closed from the start (`>&-`, `2>&-`)."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(jobkit.make_job(tokenizer_dir, inp, str(tmp_path / "out"))))
    read_end, write_end = os.pipe()
    os.close(read_end)                   # the reader is gone before anything is printed
    other = subprocess.PIPE
    fd = 1 if stream == "stdout" else 2
    try:
        return subprocess.run([sys.executable, "-m", "llmbatch.cli", "run", str(job), *args],
                              stdout=write_end if stream == "stdout" else other,
                              stderr=write_end if stream == "stderr" else other,
                              preexec_fn=(lambda: os.close(fd)) if closed else None,
                              text=True, timeout=120)
    finally:
        os.close(write_end)


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
