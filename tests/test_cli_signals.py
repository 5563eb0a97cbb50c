"""`llmbatch run` stopped by a signal: one line on stderr and the documented exit code
(SIGINT / Ctrl-C: 130, SIGTERM, as SLURM sends before its SIGKILL: 143), and a rerun resumes
to every row exactly once. SIGTERM used to end the process silently (killed by the signal)."""

import os
import signal

import pyarrow.dataset as ds
import pytest
import yaml

import llmbatch
from llmbatch import run_job
from tests.signalled_runs import committed, signal_after_parts

NUM_ROWS = 300
ROWS_PER_PART = 20


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
    err, code_got, _ = signal_after_parts(job_path, out_dir, env, signum, parts=2, timeout_s=60)
    assert (err, code_got) == (stderr, code)
    done = committed(out_dir)
    assert 2 <= done < NUM_ROWS // ROWS_PER_PART       # stopped midway, committed parts kept
    result = run_job(str(job_path))
    assert (result.exit_code, result.num_rows_skipped) == (0, done * ROWS_PER_PART)
    ids = ds.dataset(out_dir).to_table().column("id").to_pylist()
    assert ids == list(range(NUM_ROWS))
