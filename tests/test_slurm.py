"""slurm/array.sbatch against a real (local, one-node) slurmctld + slurmd.

The cluster comes from slurm/testing/start_local_cluster.sh with its own directory and free
ports, so a SLURM already on the machine is left alone. Skipped, with the reason, where the
SLURM/munge binaries are missing (CI installs them with apt-get when it can) or the cluster
does not start. Jobs run on the deterministic fake engine (exported to the batch job), so the
test proves the SLURM wiring (shards from array variables, one output folder, requeue and
resubmission resuming), not the model.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = os.path.join(REPO, "slurm", "testing", "start_local_cluster.sh")
ARRAY = os.path.join(REPO, "slurm", "array.sbatch")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
NUM_ROWS, NUM_SHARDS, ROWS_PER_PART = 23, 3, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """Environment (SLURM_CONF set) of a running local cluster; stopped at session end."""
    missing = [t for t in ("sbatch", "slurmctld", "slurmd", "munged", "scontrol")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} not on PATH; "
                    f"apt-get install slurm-wlm munge)")
    state_dir = str(tmp_path_factory.mktemp("slurm"))
    env = dict(os.environ, LLMBATCH_SLURM_DIR=state_dir,
               LLMBATCH_SLURMCTLD_PORT=str(_free_port()), LLMBATCH_SLURMD_PORT=str(_free_port()),
               SLURM_CONF=os.path.join(state_dir, "slurm.conf"))
    for name in list(env):  # a pytest run inside a SLURM job must not leak its job's variables
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            del env[name]
    proc = subprocess.run(["bash", START], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run(["bash", START, "stop"], env=env, capture_output=True, timeout=60)
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"local SLURM cluster did not start: {last}")
    try:
        yield env
    finally:
        subprocess.run(["bash", START, "stop"], env=env, capture_output=True, timeout=60)


def _tasks(env, job_id: str) -> dict[int, tuple[str, str]]:
    """array task id -> (JobState, ExitCode) of every task of an array job."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "ArrayTaskId" in fields and fields["ArrayTaskId"].isdigit():
            tasks[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
    return tasks


def _wait(env, job_id: str, task_ids: list[int], logs: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = _tasks(env, job_id)
        if set(task_ids) <= set(tasks) and all(tasks[t][0] in TERMINAL for t in task_ids):
            return tasks
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not finished after {timeout_s}s: {tasks}\n{_logs(logs)}")
        time.sleep(0.5)


def _logs(directory: str) -> str:
    texts = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".log"):
            with open(os.path.join(directory, name)) as f:
                texts.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(texts)


def _sbatch(env, workdir: str, array: str, *args: str, export: str = "") -> str:
    cmd = ["sbatch", "--parsable", f"--array={array}", "--gres=none", "--cpus-per-task=1",
           "--time=5", f"--chdir={workdir}", f"--output={workdir}/slurm-%A_%a.log",
           f"--export=ALL{export}", ARRAY, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
    return proc.stdout.strip().split(";")[0]  # "jobid[;cluster]"


def _shard_ids(out_dir: str) -> dict[int, list[int]]:
    """shard -> ids of its part files in (seq) order, read file by file."""
    import pyarrow.parquet as pq

    ids: dict[int, list[int]] = {}
    for name in sorted(os.listdir(out_dir)):
        m = re.fullmatch(r"part-(\d{5})-(\d{5})\.parquet", name)
        if m:
            table = pq.read_table(os.path.join(out_dir, name), columns=["id"])
            ids.setdefault(int(m.group(1)), []).extend(table.column("id").to_pylist())
    return ids


def _snapshot(out_dir: str) -> dict[str, bytes]:
    snap = {}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("part-"):
            with open(os.path.join(out_dir, name), "rb") as f:
                snap[name] = f.read()
    return snap


def test_array_job_shards_and_resumes(slurm_env, tmp_path, jobkit, tiny_tokenizer_dir):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import yaml

    from llmbatch.io.sharding import Shard
    from llmbatch.jobs.stats import read_stats

    work = str(tmp_path)
    data = jobkit.write_prompts(os.path.join(work, "prompts.parquet"), NUM_ROWS, seed=3)
    out = os.path.join(work, "out")
    job = jobkit.make_job(tiny_tokenizer_dir, data, out, input={"keep_columns": ["prompt"]},
                          output={"rows_per_part": ROWS_PER_PART})
    assert "shard" not in job  # shard: auto (the default), resolved from the array variables
    with open(os.path.join(work, "job.yaml"), "w") as f:
        yaml.safe_dump(job, f)
    # The batch job inherits this environment (--export=ALL) plus the fake engine.
    export = (f",LLMBATCH_ENGINE_FACTORY={jobkit.fake_engine},HF_HUB_OFFLINE=1,"
              f"LLMBATCH_PYTHON={sys.executable},PYTHONPATH={REPO}")

    job_id = _sbatch(slurm_env, work, f"0-{NUM_SHARDS - 1}", "job.yaml", export=export)
    # merge.sbatch queued behind the whole array (afterany, as documented: waits for every task
    # to end; the merge itself refuses rows missing).
    merged = os.path.join(work, "merged.parquet")
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--dependency=afterany:{job_id}", "--time=5",
         f"--chdir={work}", f"--output={work}/merge-%j.log", f"--export=ALL{export}",
         os.path.join(REPO, "slurm", "merge.sbatch"), "out", merged],
        env=slurm_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
    merge_id = proc.stdout.strip().split(";")[0]
    tasks = _wait(slurm_env, job_id, list(range(NUM_SHARDS)), work)
    assert tasks == {k: ("COMPLETED", "0:0") for k in range(NUM_SHARDS)}, _logs(work)

    # The union of the shards is the input, each row once; within a shard, input order.
    prompts = pq.read_table(data).column("prompt").to_pylist()
    table = ds.dataset(out).to_table()
    assert table.num_rows == NUM_ROWS
    rows = sorted(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))
    assert rows == list(enumerate(prompts))
    by_shard = _shard_ids(out)
    assert sorted(by_shard) == list(range(NUM_SHARDS))
    for k in range(NUM_SHARDS):
        start, end = Shard(k, NUM_SHARDS).row_range(NUM_ROWS)
        assert by_shard[k] == list(range(start, end))
    stats = read_stats(out).to_pylist()
    assert [(s["shard_index"], s["shard_count"], s["rows_skipped"]) for s in stats] == \
        [(k, NUM_SHARDS, 0) for k in range(NUM_SHARDS)]
    # The merge job ran after the array: one file, input order, and the stats printed.
    deadline = time.monotonic() + 60
    while (state := re.search(r"JobState=(\S+)", subprocess.run(
            ["scontrol", "-o", "show", "job", merge_id], env=slurm_env, capture_output=True,
            text=True, timeout=30).stdout).group(1)) not in TERMINAL:
        assert time.monotonic() < deadline, f"merge job still {state}\n{_logs(work)}"
        time.sleep(0.5)
    assert state == "COMPLETED", _logs(work)
    merged_table = pq.read_table(merged)
    assert merged_table.column("id").to_pylist() == list(range(NUM_ROWS))
    assert merged_table.column("prompt").to_pylist() == prompts
    with open(os.path.join(work, f"merge-{merge_id}.log")) as f:
        merge_log = f.read()
    # 8 + 8 + 7 rows at 4 rows per part: 2 parts per shard.
    assert f"merged 6 parts, {NUM_ROWS} rows" in merge_log, merge_log
    assert merge_log.count("shard_index=") == NUM_SHARDS
    before = _snapshot(out)

    # Rerun shard 1 twice: requeued in its array (array variables kept), then resubmitted
    # alone (LLMBATCH_NUM_SHARDS names the split). Both find the shard committed: nothing
    # is written again, each run leaves one more stats row with all 8 rows skipped.
    requeue = subprocess.run(["scontrol", "requeue", f"{job_id}_1"], env=slurm_env,
                             capture_output=True, text=True, timeout=30)
    assert requeue.returncode == 0, requeue.stderr
    # SLURM holds a requeued job for ~2 minutes (EligibleTime); make it eligible now.
    release = subprocess.run(["scontrol", "update", f"JobId={job_id}_1", "StartTime=now"],
                             env=slurm_env, capture_output=True, text=True, timeout=30)
    assert release.returncode == 0, release.stderr
    # A requeued task goes back to PENDING first; wait for it to run again, then finish.
    deadline = time.monotonic() + 60
    while len(read_stats(out)) < NUM_SHARDS + 1:
        assert time.monotonic() < deadline, f"requeued task did not rerun\n{_logs(work)}"
        time.sleep(0.5)
    assert _wait(slurm_env, job_id, [1], work)[1] == ("COMPLETED", "0:0")

    single = _sbatch(slurm_env, work, "1", "job.yaml",
                     export=export + f",LLMBATCH_NUM_SHARDS={NUM_SHARDS}")
    assert _wait(slurm_env, single, [1], work)[1] == ("COMPLETED", "0:0"), _logs(work)

    assert _snapshot(out) == before
    assert ds.dataset(out).to_table().num_rows == NUM_ROWS
    reruns = [s for s in read_stats(out).to_pylist() if s["run"] > 0]
    assert [(s["shard_index"], s["shard_count"], s["rows_skipped"], s["rows_ok"])
            for s in reruns] == [(1, NUM_SHARDS, 8, 0)] * 2  # this run: 8 skipped, 0 computed


def test_tensor_parallel_templates_on_cpu(slurm_env, tmp_path, jobkit, tiny_llama_dir):
    """tp_node.sbatch (rank 0 spawns rank 1) and tp_srun.sbatch (srun starts both ranks,
    dist.py reads SLURM_PROCID/NTASKS) run the tiny Llama at tensor_parallel_size 2 on CPU
    (gloo); the same split gives the same greedy tokens either way, every row once, in order."""
    pytest.importorskip("llmbatch.runtime.engine")
    import pyarrow.dataset as ds
    import yaml

    work = str(tmp_path)
    data = jobkit.write_prompts(os.path.join(work, "prompts.parquet"), 6, seed=5)
    outputs = {}
    jobs = {}
    env = {k: v for k, v in slurm_env.items() if k != "LLMBATCH_ENGINE_FACTORY"}
    for name, args in (("tp_node", ["--ntasks=1", "--cpus-per-task=2"]),
                       ("tp_srun", ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                                    "--cpus-per-task=1"])):
        out = os.path.join(work, f"out_{name}")
        job = jobkit.make_job(tiny_llama_dir, data, out, sampling={"max_new_tokens": 4},
                              engine={"kv_cache_blocks": 32, "device": "cpu"},
                              output={"rows_per_part": 4},
                              parallel={"tensor_parallel_size": 2})
        with open(os.path.join(work, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(job, f)
        cmd = ["sbatch", "--parsable", "--gres=none", "--time=5", f"--chdir={work}",
               f"--output={work}/{name}-%j.log", *args,
               f"--export=ALL,HF_HUB_OFFLINE=1,LLMBATCH_PYTHON={sys.executable},"
               f"PYTHONPATH={REPO}",
               os.path.join(REPO, "slurm", f"{name}.sbatch"), f"{name}.yaml"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        jobs[name] = proc.stdout.strip().split(";")[0]
        outputs[name] = out
    for name, job_id in jobs.items():
        deadline = time.monotonic() + 150
        while True:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env,
                                 capture_output=True, text=True, timeout=30).stdout
            state = re.search(r"JobState=(\S+)", out).group(1)
            if state in TERMINAL:
                break
            assert time.monotonic() < deadline, f"{name} not finished: {state}\n{_logs(work)}"
            time.sleep(0.5)
        assert (state, re.search(r"ExitCode=(\S+)", out).group(1)) == ("COMPLETED", "0:0"), \
            _logs(work)
    tables = {name: ds.dataset(out).to_table() for name, out in outputs.items()}
    for table in tables.values():
        assert table.column("id").to_pylist() == list(range(6))
        assert table.column("finish_reason").to_pylist().count("error") == 0
    assert tables["tp_node"].column("output_token_ids").to_pylist() == \
        tables["tp_srun"].column("output_token_ids").to_pylist()
