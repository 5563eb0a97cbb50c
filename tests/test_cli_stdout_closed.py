"""`llmbatch run job.yaml | head -1`: a reader that closes stdout before the summary lines does
not change the run's exit code. The job had finished and its parts and stats were on disk, but
click turned the broken pipe into a silent exit 1, which the contract reads as an internal
error (a pipeline retried a finished job)."""

import os
import subprocess
import sys

import yaml


def test_run_exit_code_survives_a_closed_stdout(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(jobkit.make_job(tiny_tokenizer_dir, inp,
                                                  str(tmp_path / "out"))))
    read_end, write_end = os.pipe()
    os.close(read_end)                   # the reader is gone before anything is printed
    proc = subprocess.run([sys.executable, "-m", "llmbatch.cli", "run", str(job),
                           "--progress", "none"], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert any(name.startswith("part-") for name in os.listdir(tmp_path / "out"))
