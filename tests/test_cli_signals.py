"""`llmbatch run` stopped by a signal: one line on stderr and the documented exit code
(SIGINT / Ctrl-C: 130, SIGTERM, as SLURM sends before its SIGKILL: 143), and a rerun resumes
to every row exactly once. SIGTERM used to end the process silently (killed by the signal)."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pytest
import yaml

import llmbatch
from llmbatch import run_job

NUM_ROWS = 300
ROWS_PER_PART = 20


def committed(out_dir):
    path = os.path.join(out_dir, "_manifest")
    return len([n for n in os.listdir(path) if n.endswith(".json")]) if os.path.isdir(path) else 0


@pytest.mark.parametrize("signum, stderr, code", [
    (signal.SIGTERM, "llmbatch: terminated\n", 143),
    (signal.SIGINT, "\nllmbatch: aborted\n", 130),    # click's blank line ends the ^C echo
])
def test_a_signalled_run_says_so_and_a_rerun_finishes_it(tmp_path, tiny_tokenizer_dir, jobkit,
                                                         fake_engine_env, signum, stderr, code):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), NUM_ROWS)
    out_dir = str(tmp_path / "out")
    job = jobkit.make_job(tiny_tokenizer_dir, inp, out_dir, output={"rows_per_part": ROWS_PER_PART},
                          engine={"ordering": "input"})
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LLMBATCH_FAKE_ENGINE_DELAY_S="0.01")        # about 3 s for the whole job
    proc = subprocess.Popen([sys.executable, "-m", "llmbatch.cli", "run", str(job_path),
                             "--progress", "none"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while committed(out_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert (err, proc.returncode) == (stderr, code)
    done = committed(out_dir)
    assert 2 <= done < NUM_ROWS // ROWS_PER_PART       # stopped midway, committed parts kept
    result = run_job(str(job_path))
    assert (result.exit_code, result.num_rows_skipped) == (0, done * ROWS_PER_PART)
    ids = ds.dataset(out_dir).to_table().column("id").to_pylist()
    assert ids == list(range(NUM_ROWS))
