"""Two run_job calls started at the same moment in threads of a fresh process: both finish.

One of them failed with "cannot import name 'PreTrainedTokenizerFast' (or 'AutoTokenizer') from
'transformers'", 3 tries of 3 with the runtime engine: the two threads raced in transformers'
lazy name resolution (llmbatch/lazy_imports.py). Only a fresh interpreter shows it (an import
done once stays done), so each try is a subprocess."""

import json
import os
import subprocess
import sys

import pytest

RACE = r"""
import json, sys, threading
from llmbatch.api import run_job

jobs = json.loads(sys.argv[1])
barrier = threading.Barrier(len(jobs))
outcome = {}

def run(i, job):
    barrier.wait()                     # both threads enter run_job together
    try:
        outcome[i] = run_job(job).exit_code
    except BaseException as exc:
        outcome[i] = f"{type(exc).__name__}: {exc}"

threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps([outcome[i] for i in range(len(jobs))]))
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("engine", ["fake", "fake", "runtime"])
def test_two_jobs_started_together_in_threads_both_finish(tmp_path, tiny_tokenizer_dir,
                                                         tiny_llama_dir, jobkit, fake_engine_env,
                                                         engine):
    # The fake engine races on its tokenizer class, the runtime on AutoTokenizer (3 of 3).
    model = tiny_llama_dir if engine == "runtime" else tiny_tokenizer_dir
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6)
    jobs = [jobkit.make_job(model, inp, str(tmp_path / f"out{i}")) for i in (0, 1)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if engine == "runtime":
        del env["LLMBATCH_ENGINE_FACTORY"]
    proc = subprocess.run([sys.executable, "-c", RACE, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0, 0]
