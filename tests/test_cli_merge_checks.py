"""`llmbatch merge` checks what it merges: the committed parts of ONE job config (not parts
left by an earlier shard layout), every input row (unless --allow-partial), no shard still
running. Each refusal is one line, exit 2, nothing written."""

import os
import shutil

import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.cli import main


@pytest.fixture
def job(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch):
    """run(n_rows, out, **sections): one run of the fake-engine job (5 rows a part); cwd is
    tmp_path."""
    monkeypatch.chdir(tmp_path)

    def run(num_rows, out="out", **sections):
        inp = jobkit.write_prompts(f"in-{num_rows}.parquet", num_rows)
        output = {"rows_per_part": 5, **sections.pop("output", {})}
        return run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out, output=output, **sections))

    return run


def call(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_refuses_parts_of_an_earlier_shard_layout(job, capsys):
    # UAT: 3 shards, then re-sharded to 2 (only task 0 ran so far): the old shard-1 parts
    # stay, and merge gave rows 10..14 twice and 20..29 never.
    old = [job(30, shard={"index": k, "count": 3}) for k in range(3)][0].config_hash
    new = job(30, shard={"index": 0, "count": 2}, output={"mode": "overwrite"}).config_hash
    assert sorted(os.listdir("out/_manifest")) == [
        "part-00000-00000.json", "part-00000-00001.json", "part-00000-00002.json",
        "part-00001-00000.json", "part-00001-00001.json"]
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == (
        f"llmbatch: error: out: committed parts come from different job configs: shard_count 2, "
        f"config_hash {new} (shard 0: part-00000-00000.parquet to part-00000-00002.parquet) vs "
        f"shard_count 3, config_hash {old} (shard 1: part-00001-00000.parquet to "
        f"part-00001-00001.parquet); merging them would double or drop rows: run every shard "
        f"of one config (output.mode: overwrite) or use a new output.path\n")
    assert not os.path.exists("all.parquet")


def test_merge_names_the_settings_two_configs_differ_in(job, capsys):
    # Shard 1 rerun with another max_new_tokens (overwrite clears only its own parts): the
    # refusal named two opaque hashes.
    for k in range(2):
        job(10, shard={"index": k, "count": 2})
    other = job(10, shard={"index": 1, "count": 2}, sampling={"max_new_tokens": 3},
                output={"mode": "overwrite"}).config_hash
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err.startswith("llmbatch: error: out: committed parts come from different job "
                          "configs: config_hash ") and err.count("\n") == 1
    assert err.endswith(f"config_hash {other} (shard 1: part-00001-00000.parquet), which "
                        f"differ in sampling.max_new_tokens 8 vs 3; merging them would double "
                        f"or drop rows: run every shard of one config (output.mode: "
                        f"overwrite) or use a new output.path\n")


def test_merge_refuses_a_part_file_of_another_config(job, capsys):
    # The manifest entry is this job's, the file under its name another job's (a copy by hand).
    mine = job(15).config_hash
    other = job(15, out="other", sampling={"max_new_tokens": 3}).config_hash
    shutil.copyfile("other/part-00000-00001.parquet", "out/part-00000-00001.parquet")
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: committed part out/part-00000-00001.parquet was written "
                   f"with config_hash {other}, its manifest entry records {mine}; rerun the job "
                   f"with output.mode: overwrite\n")
    assert not os.path.exists("all.parquet")
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


def test_merge_refuses_a_shard_that_never_ran(job, capsys):
    # UAT: one array task of 3 failed; merge wrote 200 of 300 rows and exited 0.
    for k in (0, 1):
        job(30, shard={"index": k, "count": 3})
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == ("llmbatch: error: out: incomplete: 10 of 30 rows not committed (shard 2: no "
                   "parts, rows [20, 30)); rerun the job for them, or pass --allow-partial to "
                   "merge the 20 committed rows\n")
    assert not os.path.exists("all.parquet")
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet", "--allow-partial")
    assert (code, err) == (0, "")
    assert out == ("merged 4 parts, 20 of 30 rows -> all.parquet (partial: 10 rows not "
                   "committed; shard 2: no parts, rows [20, 30))\n")
    assert pq.read_table("all.parquet").column("id").to_pylist() == list(range(20))


def test_merge_refuses_a_shard_cut_short(job, capsys):
    # A run killed after its first two parts (13 rows of 3 shards: 5, 4, 4 rows).
    for k in range(3):
        job(13, shard={"index": k, "count": 3}, output={"rows_per_part": 2})
    os.remove("out/_manifest/part-00000-00002.json")      # its last part: [4, 5)
    os.remove("out/_manifest/part-00002-00001.json")      # [11, 13)
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == ("llmbatch: error: out: incomplete: 3 of 13 rows not committed (shard 0: rows "
                   "[4, 5); shard 2: rows [11, 13)); rerun the job for them, or pass "
                   "--allow-partial to merge the 10 committed rows\n")
    code, out, _ = call(capsys, "merge", "out", "-o", "all.parquet", "--allow-partial")
    assert code == 0 and out.startswith("merged 5 parts, 10 of 13 rows -> all.parquet (partial")
    assert pq.read_table("all.parquet").column("id").to_pylist() == [0, 1, 2, 3, 5, 6, 7, 8,
                                                                        9, 10]


def test_merge_refuses_a_shard_still_running(job, capsys):
    from llmbatch.jobs.shard_lock import ShardLock

    job(10, shard={"index": 1, "count": 2})
    job(10, shard={"index": 0, "count": 2})
    with ShardLock(os.path.abspath("out"), 1):          # a run of shard 1 (here: this pid)
        code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
        assert (code, out) == (2, "")
        assert err == (f"llmbatch: error: out: shard 1 (pid {os.getpid()}) is being written by "
                       f"a running job; wait for it to end, or pass --allow-partial to merge "
                       f"what is committed now\n")
        code, out, err = call(capsys, "merge", "out", "-o", "all.parquet", "--allow-partial")
        assert (code, err) == (0, "")
        assert out == (f"merged 2 parts, 10 of 10 rows -> all.parquet (partial: shard 1 (pid "
                       f"{os.getpid()}) still running)\n")
    # Released (the run ended): a lock file nobody holds is no running job.
    code, out, _ = call(capsys, "merge", "out", "-o", "all.parquet", "--overwrite")
    assert (code, out) == (0, "merged 2 parts, 10 rows -> all.parquet\n")


def _merge_sbatch(tmp_path, *args, **env):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(["bash", os.path.join(repo, "slurm", "merge.sbatch"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMBATCH_PYTHON": sys.executable,
                               "PYTHONPATH": repo, **env})


def test_merge_sbatch_fails_loudly_on_a_failed_task(job, tmp_path):
    # Run as a plain script (what SLURM runs after `afterany`): a task that never committed
    # its rows fails the merge job with the reason in its log, no short file written.
    job(10, shard={"index": 0, "count": 2})
    proc = _merge_sbatch(tmp_path, "out", "all.parquet")
    assert proc.returncode == 2
    assert proc.stderr == ("llmbatch: error: out: incomplete: 5 of 10 rows not committed "
                           "(shard 1: no parts, rows [5, 10)); rerun the job for them, or pass "
                           "--allow-partial to merge the 5 committed rows\n")
    assert not os.path.exists("all.parquet")
    proc = _merge_sbatch(tmp_path, "out", "all.parquet", LLMBATCH_MERGE_ALLOW_PARTIAL="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged 1 part, 5 of 10 rows -> all.parquet (partial")
    job(10, shard={"index": 1, "count": 2})
    assert _merge_sbatch(tmp_path, "out", "all.parquet").returncode == 2     # exists
    proc = _merge_sbatch(tmp_path, "out", "all.parquet", LLMBATCH_MERGE_OVERWRITE="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged 2 parts, 10 rows -> all.parquet\nshard_index=")


def test_a_0_row_job_merges_into_an_empty_file_with_the_output_schema(job, capsys):
    # A 0-row input wrote no part: merge said "no committed parts" (exit 2) and a reader of
    # the folder found no schema. An empty shard now commits one empty part.
    import pyarrow.dataset as ds

    first = job(0)
    assert [os.path.basename(p) for p in first.part_paths] == ["part-00000-00000.parquet"]
    job(3, out="full")                                     # the schema a non-empty job writes
    schema = pq.read_schema("full/part-00000-00000.parquet").remove_metadata()
    assert ds.dataset("out").schema.remove_metadata() == schema
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out, err) == (0, "merged 1 part, 0 rows -> all.parquet\n", "")
    merged = pq.read_table("all.parquet")
    assert merged.num_rows == 0 and merged.schema.remove_metadata() == schema
    # A resume finds it committed: nothing written again, no second part.
    again = job(0)
    assert (again.num_rows, again.num_rows_skipped) == (0, 0)
    assert sorted(os.listdir("out/_manifest")) == ["part-00000-00000.json"]


def test_an_empty_shard_of_a_small_input_is_committed_too(job, capsys):
    # 2 rows over 3 shards: shard 2's range is empty; its run leaves an empty part so the
    # folder shows it done like the others.
    for k in range(3):
        job(2, shard={"index": k, "count": 3})
    assert sorted(os.listdir("out/_manifest")) == [
        "part-00000-00000.json", "part-00001-00000.json", "part-00002-00000.json"]
    assert pq.read_metadata("out/part-00002-00000.parquet").num_rows == 0
    code, out, _ = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (0, "merged 3 parts, 2 rows -> all.parquet\n")
    assert pq.read_table("all.parquet").column("id").to_pylist() == [0, 1]


def _edit_entries(pattern, edit):
    """Rewrite the manifest entries of out/ matching `pattern` as edit(entry) returns them."""
    import glob
    import json

    for path in glob.glob(f"out/_manifest/{pattern}"):
        with open(path) as f:
            entry = json.load(f)
        with open(path, "w") as f:
            json.dump(edit(entry), f)


def _drop_keys(pattern, *keys):
    _edit_entries(pattern, lambda entry: {k: v for k, v in entry.items() if k not in keys})


def test_parts_written_by_an_older_llmbatch_still_merge(job, capsys):
    # Entries of builds before num_input_rows was recorded: merge died with "internal error:
    # KeyError: 'num_input_rows'" (exit 1). The checks that need a missing key are skipped.
    for k in range(2):
        job(10, shard={"index": k, "count": 2})
    _drop_keys("part-00000-*.json", "num_input_rows")       # shard 0 run by an older build
    # Shard 1's entry still records the job's rows: completeness is checked (and holds).
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out, err) == (0, "merged 2 parts, 10 rows -> all.parquet\n", "")
    assert pq.read_table("all.parquet").column("id").to_pylist() == list(range(10))
    _drop_keys("part-00001-*.json", "num_input_rows")       # no entry records it now
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet", "--overwrite")
    assert (code, out, err) == (0, "merged 2 parts, 10 rows -> all.parquet (completeness not "
                                   "checked: parts written by an older llmbatch)\n", "")
    _drop_keys("*.json", "num_input_rows", "config_hash")
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet", "--overwrite")
    assert (code, out, err) == (0, "merged 2 parts, 10 rows -> all.parquet (config and "
                                   "completeness not checked: parts written by an older "
                                   "llmbatch)\n", "")
    os.remove("out/_manifest/part-00001-00000.json")     # one shard only: nothing tells so
    code, out, _ = call(capsys, "merge", "out", "-o", "all.parquet", "--overwrite")
    assert (code, out) == (0, "merged 1 part, 5 rows -> all.parquet (config and completeness "
                              "not checked: parts written by an older llmbatch)\n")


def test_shards_run_across_an_upgrade_are_still_checked_for_completeness(job, capsys):
    """Shard 0 by an older build (no num_input_rows), shard 1 by this one, shard 2 never run:
    the rows are known from shard 1's entry, so the merge refuses (found in review: it merged
    4 of 6 rows with exit 0 because one entry lacked the key)."""
    for k in range(2):
        job(6, shard={"index": k, "count": 3})
    _drop_keys("part-00000-*.json", "num_input_rows")
    code, out, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == ("llmbatch: error: out: incomplete: 2 of 6 rows not committed (shard 2: no "
                   "parts, rows [4, 6)); rerun the job for them, or pass --allow-partial to "
                   "merge the 4 committed rows\n")
    assert not os.path.exists("all.parquet")


def test_an_older_entry_does_not_hide_a_config_difference_among_newer_ones(job, capsys):
    for k in range(3):
        job(6, shard={"index": k, "count": 3})
    _drop_keys("part-00000-*.json", "config_hash")           # shard 0 by an older build
    _edit_entries("part-00002-*.json",                        # shard 2: another config
                  lambda entry: {**entry, "config_hash": "0123456789abcdef"})
    code, _, err = call(capsys, "merge", "out", "-o", "all.parquet")
    assert code == 2 and err.count("\n") == 1
    assert "committed parts come from different job configs: config_hash " in err
    assert "config_hash 0123456789abcdef (shard 2: part-00002-00000.parquet)" in err

