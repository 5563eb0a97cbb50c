"""A spawned tensor-parallel rank that dies before it joins the group fails the job within
seconds, not after the collective timeout: rank 0 hosts the rendezvous store and, while it
waits for the workers to connect, checks that none has exited (dist.wait_for_workers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from llmbatch.runtime.dist import (Rendezvous, free_port, host_store, join_store,
                                   wait_for_workers)

# A pipeline script without `if __name__ == "__main__":`: the spawned rank 1 runs it again,
# finds the shard locked by rank 0's run and exits 2 before it ever joins the group.
NO_MAIN_GUARD = """
import sys
from llmbatch import run_job
from llmbatch.api import JobError
job = {"model": {"path": %(model)r, "dtype": "float32"}, "input": {"path": %(inp)r},
       "output": {"path": %(out)r}, "sampling": {"max_new_tokens": 3},
       "engine": {"device": "cpu", "kv_cache_blocks": 32},
       "parallel": {"tensor_parallel_size": 2}}
try:
    run_job(job)
except JobError as e:
    print("job failed:", e.message, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_a_rank_dying_before_the_group_exists_fails_the_job_within_seconds(
        tmp_path, tiny_llama_dir, jobkit):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    script = tmp_path / "pipeline.py"
    script.write_text(NO_MAIN_GUARD % dict(model=tiny_llama_dir, inp=inp,
                                           out=str(tmp_path / "out")))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMBATCH_ENGINE_FACTORY", "RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env.update(PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1", LLMBATCH_TP_TIMEOUT_S="300")
    start = time.monotonic()
    # Before the fix rank 0 waited the whole 300 s: the subprocess timeout fails the test.
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("job failed:")]
    assert len(lines) == 2, proc.stderr[-3000:]  # rank 1's own line, then rank 0's
    assert "shard 0 is being written by another run" in lines[0]
    assert lines[1].startswith("job failed: the engine failed to start: TensorParallelError: "
                               "tensor-parallel job failed starting: tensor-parallel rank 1 "
                               "(pid "), lines[1]
    assert lines[1].endswith(") exited with code 2 before joining the group (its own error is "
                             "printed above; a script running a tensor-parallel job needs its "
                             "run_job call under `if __name__ == \"__main__\":`, since each "
                             "rank imports it again)"), lines[1]
    assert "Traceback" not in proc.stderr
    assert elapsed < 90


class FakeProcess:
    def __init__(self, pid: int, exitcode=None):
        self.pid, self.exitcode = pid, exitcode


def spawned_rendezvous(world_size: int) -> Rendezvous:
    return Rendezvous(0, world_size, 0, "127.0.0.1", free_port(), launched=False)


def test_wait_for_workers_names_a_worker_that_exits_before_joining():
    rdv = spawned_rendezvous(3)
    store = host_store(rdv, timeout_s=300)
    procs = [FakeProcess(101), FakeProcess(102, exitcode=-9)]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^tensor-parallel rank 2 \(pid 102\) killed by "
                                           r"signal 9$"):
        wait_for_workers(store, procs, timeout_s=300)
    assert time.monotonic() - start < 2.0


def test_wait_for_workers_returns_once_every_worker_joined_and_times_out_otherwise():
    rdv = spawned_rendezvous(3)
    store = host_store(rdv, timeout_s=30)
    procs = [FakeProcess(101), FakeProcess(102)]
    join_store(Rendezvous(1, 3, 1, rdv.master_addr, rdv.master_port, launched=False), 30)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^tensor-parallel rank 2 did not join the group "
                                           r"within 0.6s$"):
        wait_for_workers(store, procs, timeout_s=0.6)
    assert 0.6 <= time.monotonic() - start < 2.0
    client = join_store(Rendezvous(2, 3, 2, rdv.master_addr, rdv.master_port, launched=False),
                        30)
    start = time.monotonic()
    wait_for_workers(store, procs, timeout_s=30)
    assert time.monotonic() - start < 1.0
    assert client.get("llmbatch/joined/2") == b"1"


def test_host_store_refuses_a_port_in_use():
    rdv = spawned_rendezvous(2)
    first = host_store(rdv, timeout_s=5)
    with pytest.raises(RuntimeError, match="(?i)address already in use|EADDRINUSE"):
        host_store(rdv, timeout_s=5)
    del first


def die_before_joining(rank, *args):
    os._exit(3)


def test_executor_start_fails_at_once_and_frees_the_port(tiny_llama_dir, monkeypatch):
    """In-process: a worker that exits before joining fails TPExecutor within seconds with
    the usual one line, and the rendezvous port is free again (a retry on a SLURM-derived
    port binds the same one) while the caller still holds the error."""
    import torch.distributed as dist

    from llmbatch.runtime import tp_executor
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.dist import detect_rendezvous

    monkeypatch.setattr(tp_executor, "worker_main", die_before_joining)
    rdv = detect_rendezvous(2, {})
    config = EngineConfig(model=tiny_llama_dir, device="cpu", dtype="float32",
                          tensor_parallel_size=2)
    start = time.monotonic()
    with pytest.raises(tp_executor.TensorParallelError) as info:
        tp_executor.TPExecutor(config, timeout_s=300, rdv=rdv)
    assert time.monotonic() - start < 30
    assert re.fullmatch(r"tensor-parallel job failed starting: tensor-parallel rank 1 "
                        r"\(pid \d+\) exited with code 3 before joining the group \(its own "
                        r"error is printed above; .*\)",
                        str(info.value)), str(info.value)
    assert not dist.is_initialized()
    assert host_store(rdv, timeout_s=5) is not None
