"""A job launched under torchrun with tensor_parallel_size 2 (gloo, CPU): rank 0 owns the output
folder, rank 1 only serves engine steps, and the rows equal the tensor_parallel_size 1 run."""

import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest
import yaml

from llmbatch.jobs.errors import InternalError

COLUMNS = ["id", "output_token_ids", "output_text", "finish_reason", "num_prompt_tokens"]


def _rows(out: str) -> list[dict]:
    return ds.dataset(out).to_table(columns=COLUMNS).to_pylist()


def test_rank_above_zero_touches_no_output_before_the_engine(tmp_path, tiny_llama_dir, jobkit,
                                                             monkeypatch):
    """RANK=1 of a launched TP job: the engine is built first and nothing reads or writes the
    output folder (the stale temporary that rank 0 would clean up stays)."""
    from llmbatch import run_job

    out = tmp_path / "out"
    out.mkdir()
    stale = out / "part-00000-00000.parquet.tmp"
    stale.write_bytes(b"stale")
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)
    seen = []

    def factory(config):
        seen.append(sorted(os.listdir(out)))
        raise SystemExit(0)   # what the real engine does on rank > 0 when rank 0 shuts down

    # The input does not exist: a worker rank does not even plan (rank 0 validates).
    job = jobkit.make_job(tiny_llama_dir, str(tmp_path / "missing.parquet"), str(out),
                          parallel={"tensor_parallel_size": 2})
    with pytest.raises(SystemExit):
        run_job(job, engine_factory=factory)
    assert seen == [[stale.name]]
    assert sorted(os.listdir(out)) == [stale.name]

    def returns(config):
        return object()
    with pytest.raises(InternalError, match="rank 1: the engine returned on a worker rank"):
        run_job(job, engine_factory=returns)


def test_torchrun_cli_job_equals_tp1(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    from llmbatch import run_job
    from llmbatch.runtime.dist import free_port

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 8, seed=3)
    common = dict(sampling={"max_new_tokens": 5}, model={"path": tiny_llama_dir,
                                                         "dtype": "float32"},
                  engine={"kv_cache_blocks": 32, "device": "cpu"}, output={"rows_per_part": 3})
    tp1 = str(tmp_path / "tp1")
    assert run_job(jobkit.make_job(tiny_llama_dir, inp, tp1, **common)).num_rows_ok == 8

    tp2 = str(tmp_path / "tp2")
    job = jobkit.make_job(tiny_llama_dir, inp, tp2, parallel={"tensor_parallel_size": 2},
                          **common)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "LLMBATCH_ENGINE_FACTORY"}
    env.update(PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "llmbatch.cli", "run",
         str(tmp_path / "job.yaml"), "--progress", "none"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One summary line: only rank 0 ran the job layer.
    assert proc.stdout.count("shard 0/1: 8 rows (8 ok") == 1, proc.stdout
    assert _rows(tp2) == _rows(tp1)
    assert len(_rows(tp1)) == 8
    names = sorted(n for n in os.listdir(tp2) if n.endswith(".parquet"))
    assert names == sorted(n for n in os.listdir(tp1) if n.endswith(".parquet"))


def test_two_tensor_parallel_jobs_in_one_process(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    """A pipeline calling run_job twice with tensor_parallel_size 2 (spawned gloo ranks): the
    first job's workers and process group end with it, so the second starts (it failed with
    'a torch.distributed process group already exists', a bare RuntimeError; found by a
    user-acceptance test). Both give the tensor_parallel_size 1 rows."""
    import torch.distributed as dist

    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4, seed=5)
    common = dict(sampling={"max_new_tokens": 3}, model={"path": tiny_llama_dir,
                                                         "dtype": "float32"},
                  engine={"kv_cache_blocks": 32, "device": "cpu"})
    tp1 = str(tmp_path / "tp1")
    assert run_job(jobkit.make_job(tiny_llama_dir, inp, tp1, **common)).num_rows_ok == 4
    for name in ("a", "b"):
        out = str(tmp_path / name)
        result = run_job(jobkit.make_job(tiny_llama_dir, inp, out,
                                         parallel={"tensor_parallel_size": 2}, **common))
        assert result.num_rows_ok == 4 and _rows(out) == _rows(tp1)
        assert not dist.is_initialized()


def test_a_tensor_parallel_start_failure_is_a_job_error(monkeypatch, tmp_path, tiny_llama_dir,
                                                        jobkit):
    """The engine's TP start failing (a rank that died, a group that timed out) reaches an
    API caller as an InternalError (a JobError, exit 1) with one line, not a RuntimeError."""
    from llmbatch import run_job
    from llmbatch.runtime import tp_executor

    def fail(config, rdv=None):
        raise tp_executor.TensorParallelError(
            "tensor-parallel job failed starting: tensor-parallel rank 1 (pid 7) exited with "
            "code 1 (collective timeout 20s)")

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    monkeypatch.setattr(tp_executor, "TPExecutor", fail)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                          parallel={"tensor_parallel_size": 2},
                          engine={"device": "cpu"})
    with pytest.raises(InternalError) as info:
        run_job(job)
    assert info.value.exit_code == 1
    assert info.value.message == (
        "the engine failed to start: TensorParallelError: tensor-parallel job failed starting: "
        "tensor-parallel rank 1 (pid 7) exited with code 1 (collective timeout 20s)")
    assert not os.path.exists(tmp_path / "out")
