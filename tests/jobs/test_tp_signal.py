"""A tensor-parallel run stopped by SIGTERM (what SLURM sends before its SIGKILL) or Ctrl-C
ends at once with its line and exit code. The signal unwinds rank 0 out of a step while the
workers are still inside that step's collectives; shutting down as if the step had finished
(broadcast the stop message, barrier) waited out the whole group timeout, past SLURM's grace
period, with the GPUs and the shard lock held."""

import os
import signal

import yaml

import llmbatch
from tests.signalled_runs import committed, signal_after_parts


def test_sigterm_ends_a_tensor_parallel_run_without_waiting_for_the_group_timeout(
        tmp_path, tiny_llama_dir, jobkit):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 400)
    out_dir = str(tmp_path / "out")
    job = {"model": {"path": tiny_llama_dir, "dtype": "float32"}, "input": {"path": inp},
           "output": {"path": out_dir, "rows_per_part": 8},
           "sampling": {"max_new_tokens": 48, "ignore_eos": True},
           "engine": {"device": "cpu", "max_num_seqs": 8, "ordering": "input"},
           "parallel": {"tensor_parallel_size": 2}}
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMBATCH_ENGINE_FACTORY", "RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env.update(PYTHONPATH=repo, HF_HUB_OFFLINE="1", LLMBATCH_TP_TIMEOUT_S="120")
    err, code, waited = signal_after_parts(job_path, out_dir, env, signal.SIGTERM, parts=1)
    assert (err, code) == ("llmbatch: terminated\n", 143)
    assert waited < 30, f"took {waited:.0f} s: waited for the group timeout (120 s)"
    assert 1 <= committed(out_dir) < 50
