"""Exactly-once resume: a 2,000-row job SIGKILLed at several points, then rerun, gives exactly the
rows (ids, texts, order, part boundaries) of an uninterrupted run.

The killed run is a real `llmbatch run` subprocess on the deterministic fake engine
(LLMBATCH_ENGINE_FACTORY). Kills come two ways: at exact commit steps through the test seam
LLMBATCH_TEST_CRASH_AT=stage:seq (the process SIGKILLs itself), and from outside at whatever
point the run has reached.
"""

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
from llmbatch.api import plan_job

NUM_ROWS = 2000
ROWS_PER_PART = 128            # 16 parts, the last one short (80 rows)
COMPARED = ["id", "prompt", "output_text", "output_token_ids", "finish_reason", "error"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir, jobkit):
    root = tmp_path_factory.mktemp("resume")
    inp = jobkit.write_prompts(str(root / "in.parquet"), NUM_ROWS, seed=3)
    os.environ["LLMBATCH_ENGINE_FACTORY"] = jobkit.fake_engine
    try:
        ref_dir = str(root / "reference")
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, ref_dir,
                                input={"keep_columns": ["prompt"]},
                                output={"rows_per_part": ROWS_PER_PART}))
    finally:
        del os.environ["LLMBATCH_ENGINE_FACTORY"]
    return root, inp, ds.dataset(ref_dir).to_table().select(COMPARED), sorted(
        n for n in os.listdir(ref_dir) if n.startswith("part-"))


def write_job(setup, tokenizer_dir, jobkit, name):
    root, inp, _, _ = setup
    job = jobkit.make_job(tokenizer_dir, inp, str(root / name),
                          input={"keep_columns": ["prompt"]},
                          output={"rows_per_part": ROWS_PER_PART})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path), str(root / name)


def cli_env(jobkit, **extra):
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env["LLMBATCH_ENGINE_FACTORY"] = jobkit.fake_engine
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "LLMBATCH_TEST_CRASH_AT"):
        env.pop(name, None)
    env.update(extra)
    return env


def start_cli(job_path, env):
    return subprocess.Popen([sys.executable, "-m", "llmbatch.cli", "run", job_path,
                             "--progress", "none"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def committed(out_dir):
    path = os.path.join(out_dir, "_manifest")
    return len([n for n in os.listdir(path) if n.endswith(".json")]) if os.path.isdir(path) else 0


def kill_after(proc, out_dir, parts):
    """SIGKILL the run once `parts` parts are committed (wherever it is by then)."""
    deadline = time.time() + 60
    while committed(out_dir) < parts and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def crash_at(job_path, jobkit, stage):
    proc = start_cli(job_path, cli_env(jobkit, LLMBATCH_TEST_CRASH_AT=stage))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()


def check_resumed(setup, out_dir, monkeypatch, jobkit, job_path):
    _, _, reference, ref_parts = setup
    done_before = committed(out_dir)
    assert done_before < len(ref_parts)           # the kill really left the job unfinished
    monkeypatch.setenv("LLMBATCH_ENGINE_FACTORY", jobkit.fake_engine)
    result = run_job(job_path)
    assert result.num_rows_skipped == done_before * ROWS_PER_PART
    assert result.exit_code == 0 and result.num_rows_ok == NUM_ROWS
    table = ds.dataset(out_dir).to_table().select(COMPARED)
    assert table.num_rows == NUM_ROWS
    assert table.equals(reference)
    assert sorted(n for n in os.listdir(out_dir) if n.startswith("part-")) == ref_parts
    assert not [n for n in os.listdir(out_dir) if n.startswith("_tmp")]


@pytest.mark.parametrize("stage", ["after_commit:0", "before_rename:3", "after_rename:15"])
def test_kill_at_each_commit_step(setup, tiny_tokenizer_dir, jobkit, monkeypatch, stage):
    job_path, out_dir = write_job(setup, tiny_tokenizer_dir, jobkit, stage.replace(":", "_"))
    crash_at(job_path, jobkit, stage)
    if stage.startswith("after_rename"):
        # The part file is in place but not committed: a reader could see it, resume must not.
        assert os.path.exists(os.path.join(out_dir, f"part-00000-{int(stage[-2:].strip(':')):05d}"
                                                    f".parquet"))
    check_resumed(setup, out_dir, monkeypatch, jobkit, job_path)


@pytest.mark.parametrize("parts", [0, 6])
def test_kill_from_outside_midway(setup, tiny_tokenizer_dir, jobkit, monkeypatch, parts):
    job_path, out_dir = write_job(setup, tiny_tokenizer_dir, jobkit, f"outside_{parts}")
    proc = start_cli(job_path, cli_env(jobkit, LLMBATCH_FAKE_ENGINE_DELAY_S="0.001"))
    kill_after(proc, out_dir, parts)
    check_resumed(setup, out_dir, monkeypatch, jobkit, job_path)


def test_killed_twice_then_finished(setup, tiny_tokenizer_dir, jobkit, monkeypatch):
    job_path, out_dir = write_job(setup, tiny_tokenizer_dir, jobkit, "twice")
    crash_at(job_path, jobkit, "after_rename:2")
    proc = start_cli(job_path, cli_env(jobkit, LLMBATCH_FAKE_ENGINE_DELAY_S="0.001"))
    kill_after(proc, out_dir, 8)
    check_resumed(setup, out_dir, monkeypatch, jobkit, job_path)


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_damaged_committed_part_is_produced_again(setup, tiny_tokenizer_dir, jobkit,
                                                  monkeypatch, capsys, damage):
    # A truncated committed part used to count as done: the rerun exited 0, its rows lost;
    # a deleted one made the rerun refuse.
    _, _, reference, ref_parts = setup
    job_path, out_dir = write_job(setup, tiny_tokenizer_dir, jobkit, f"damaged_{damage}")
    monkeypatch.setenv("LLMBATCH_ENGINE_FACTORY", jobkit.fake_engine)
    run_job(job_path)
    part = os.path.join(out_dir, "part-00000-00005.parquet")
    with open(part, "rb") as f:
        data = f.read()
    if damage == "delete":
        os.remove(part)
    else:
        with open(part, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncate" else b"")
    assert plan_job(job_path).rows_done == 5 * ROWS_PER_PART
    capsys.readouterr()
    result = run_job(job_path)
    assert result.num_rows_skipped == 5 * ROWS_PER_PART
    assert result.exit_code == 0 and result.num_rows_ok == NUM_ROWS
    assert result.stats["rows_ok"] == NUM_ROWS - 5 * ROWS_PER_PART
    err = capsys.readouterr().err
    head = f"llmbatch: output.path {out_dir}: committed part part-00000-00005.parquet is "
    tail = "its rows and those of the 10 parts after it are produced again\n"
    if damage == "delete":
        assert err == head + "missing; " + tail
    else:
        assert err.startswith(head + "damaged (") and err.endswith("); " + tail)
    assert err.count("\n") == 1
    assert ds.dataset(out_dir).to_table().select(COMPARED).equals(reference)
    assert sorted(n for n in os.listdir(out_dir) if n.startswith("part-")) == ref_parts
    assert committed(out_dir) == len(ref_parts)
