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
