"""Review of sampling.n (837bf7b, f51eb1d): the bugs it found (each test failed before its fix)
and gaps the feature's own tests left (sharded merge lines, one failed sample of a row)."""

import dataclasses
import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch import run_job
from llmbatch.jobs.errors import InternalError, InvalidJobError, RowError
from llmbatch.jobs.fake_engine import FakeEngine
from llmbatch.jobs.stats import read_stats

SAMPLED = {"temperature": 1.0, "max_new_tokens": 4, "seed": 7}


# -- a kept input column named sample_index ------------------------------------------------
def test_kept_sample_index_column_keeps_its_values_at_n_1(tmp_path, tiny_tokenizer_dir, jobkit,
                                                          fake_engine_env):
    """Was: RowSamples.with_index set row["sample_index"] for every job, n == 1 included, so
    a kept input column of that name (no sample_index output column at n == 1) is silently
    overwritten with 0 in every row: [0, 0, 0, 0] instead of the input's values."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4, sample_index=[10, 11, 12, 13])
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                     input={"keep_columns": ["sample_index"]}))
    assert result.exit_code == 0
    table = ds.dataset(out).to_table()
    assert table.column_names[:2] == ["sample_index", "id"]
    assert table.column("sample_index").to_pylist() == [10, 11, 12, 13]


def test_kept_sample_index_column_is_refused_above_n_1(tmp_path, tiny_tokenizer_dir, jobkit,
                                                       fake_engine_env):
    """Was: io/prompts.check_columns refused keep_columns that clash with output columns, but
    OUTPUT_COLUMNS lacks sample_index: with n > 1 the job runs (exit 0), writes parts with two
    `sample_index` fields (the kept values lost), and pyarrow.dataset cannot read the folder
    ('Multiple matches for FieldRef.Name(sample_index)')."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4, sample_index=[10, 11, 12, 13])
    out = str(tmp_path / "out")
    job = jobkit.make_job(tiny_tokenizer_dir, inp, out, input={"keep_columns": ["sample_index"]},
                          sampling=dict(SAMPLED, n=2))
    with pytest.raises(InvalidJobError, match=r"^input\.keep_columns: 'sample_index' clashes "
                                              r"with an output column"):
        run_job(job)
    assert not os.path.exists(out)


# -- a failure while filling a row is not "the same id twice" -------------------------------
class _BadLogprobs(FakeEngine):
    """Logprobs entries without 'token_id' (a custom engine's malformed result)."""

    def _finish(self, request):
        result = super()._finish(request)
        return dataclasses.replace(result, logprobs=[{"id": t, "logprob": -0.5}
                                                     for t in result.output_token_ids])


@pytest.mark.parametrize("n", [1, 2])
def test_a_result_that_cannot_fill_its_row_is_not_called_a_duplicate(tmp_path,
                                                                      tiny_tokenizer_dir,
                                                                      jobkit, n,
                                                                      fake_engine_env):
    """Was (low): runner._on_result wrapped RowSamples.add_result, which calls the fill
    callback, in `except KeyError` meant for a sample arriving twice; a KeyError from
    fill_from_result (logprobs_to_rows' entry["token_id"]) is reported as 'engine returned
    request id 0 twice', at n == 1 too. Before sampling.n it was 'engine failed: KeyError:
    'token_id''."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"),
                          sampling=dict(SAMPLED, n=n, logprobs=1))
    with pytest.raises(InternalError) as info:
        run_job(job, engine_factory=_BadLogprobs)
    assert "twice" not in str(info.value)
    assert str(info.value) == "engine failed: KeyError: 'token_id'"


# -- the planner window splits a row's samples ------------------------------------------------
@pytest.mark.parametrize("ordering", ["input", "prefix"])
def test_samples_of_a_row_are_never_split_by_the_planner_window(tmp_path, tiny_llama_dir,
                                                               jobkit, monkeypatch, ordering):
    """Was (low, prefix-cache reuse only): the engine's Planner counted engine.planner_window
    in requests (n per row), while README says windows of planner_window input rows; a window
    boundary inside a row's samples starts a new leader chain (ordering=input) or a new sorted
    window (prefix), so a sample after it computes the prompt again, in the same step as
    sample 0, instead of reading it from the prefix cache as README promises 'either
    engine.ordering'. With planner_window 4 and n 3: row 1 sample 1 and row 2 sample 2 got 0
    cached tokens. Fixed: spec.engine_config passes planner_window * n."""
    pytest.importorskip("llmbatch.runtime.engine")
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4, seed=3)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, inp, out,
        engine={"device": "cpu", "kv_cache_blocks": 64, "ordering": ordering,
                "planner_window": 4},
        sampling={"max_new_tokens": 5, "temperature": 1.0, "seed": 7, "n": 3}))
    assert (result.num_rows_ok, result.exit_code) == (4, 0)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [(r["id"], r["num_prompt_tokens"]) for r in rows if r["sample_index"] == 0] == \
        [(0, 20), (1, 24), (2, 18), (3, 18)]
    assert [(r["id"], r["sample_index"], r["num_cached_prompt_tokens"]) for r in rows
            if r["sample_index"]] == [(i, j, 16) for i in range(4) for j in (1, 2)]


# -- gaps: one failed sample; shards under SLURM, plan and merge lines ------------------------
class _OneSampleFails(FakeEngine):
    """Request 4 (row 1, sample 1 at n == 3) ends as an engine error."""

    def _finish(self, request):
        result = super()._finish(request)
        if request.request_id == 4:
            return dataclasses.replace(result, finish_reason="error", error="boom",
                                       output_token_ids=[], output_text="",
                                       num_output_tokens=0)
        return result


def test_one_failed_sample_makes_its_row_an_error_row_once(tmp_path, tiny_tokenizer_dir,
                                                           jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out, sampling=dict(SAMPLED, n=3)),
                     engine_factory=_OneSampleFails)
    assert (result.num_rows, result.num_rows_ok, result.num_rows_error, result.exit_code) == \
        (5, 4, 1, 3)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows if r["finish_reason"] == "error"] == \
        [(1, 1)]
    assert [r["error"] for r in rows if r["error"] is not None] == ["boom"]
    assert len(rows) == 15
    entry = json.load(open(os.path.join(out, "_manifest", "part-00000-00000.json")))
    assert (entry["num_rows"], entry["num_output_rows"], entry["num_errors"]) == (5, 15, 1)
    stats = read_stats(out).to_pylist()[0]
    assert (stats["rows_ok"], stats["rows_error"]) == (4, 1)
    assert stats["output_tokens"] == sum(r["num_output_tokens"] for r in rows)
    with pytest.raises(RowError, match=r"^row 1: boom \(on_row_error: fail\)$"):
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "fail"),
                                sampling=dict(SAMPLED, n=3), on_row_error="fail"),
                engine_factory=_OneSampleFails)


def _cli(args, jobkit, **env):
    import llmbatch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    full = dict(os.environ, PYTHONPATH=repo, LLMBATCH_ENGINE_FACTORY=jobkit.fake_engine,
                HF_HUB_OFFLINE="1")
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_STEP", "LLMBATCH_TEST_CRASH_AT"):
        full.pop(name, None)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "llmbatch.cli", *args], env=full,
                          capture_output=True, text=True, timeout=180)


def test_sharded_n_job_plans_and_merges_in_input_rows(tmp_path, tiny_tokenizer_dir, jobkit):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 7)
    out = str(tmp_path / "out")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                                  output={"rows_per_part": 2},
                                                  sampling=dict(SAMPLED, n=3))))
    task = {"SLURM_ARRAY_TASK_COUNT": "2"}
    ran = _cli(["run", str(job), "--progress", "none"], jobkit, SLURM_ARRAY_TASK_ID="1", **task)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("shard 1/2: 3 rows (3 ok, 0 error, 0 resumed), ")
    plan = _cli(["plan", str(job)], jobkit, SLURM_ARRAY_TASK_ID="1", **task)
    assert plan.stdout.splitlines()[1] == "shard 1 of 2: rows [4, 7) = 3 rows; 3 done, 0 to run"
    dest = str(tmp_path / "all.parquet")
    refused = _cli(["merge", out, "-o", dest], jobkit)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"llmbatch: error: {out}: incomplete: 4 of 7 rows not committed (shard 0: no parts, "
        f"rows [0, 4)); rerun the job for them, or pass --allow-partial to merge the 3 "
        f"committed rows")
    partial = _cli(["merge", out, "-o", dest, "--allow-partial"], jobkit)
    assert partial.stdout.strip() == (
        f"merged 2 parts, 3 of 7 rows (9 output rows) -> {dest} (partial: 4 rows not "
        f"committed; shard 0: no parts, rows [0, 4))")
    ran = _cli(["run", str(job), "--progress", "none"], jobkit, SLURM_ARRAY_TASK_ID="0", **task)
    assert ran.returncode == 0, ran.stderr
    merged = _cli(["merge", out, "-o", dest, "--overwrite"], jobkit)
    assert merged.stdout.strip() == f"merged 4 parts, 7 rows (21 output rows) -> {dest}"
    table = pq.read_table(dest)
    assert table.column("id").to_pylist() == [i for i in range(7) for _ in range(3)]
    assert table.column("sample_index").to_pylist() == [0, 1, 2] * 7
    assert [(s["shard_index"], s["rows_total"], s["rows_ok"]) for s in
            read_stats(out).to_pylist()] == [(0, 4, 4), (1, 3, 3)]
