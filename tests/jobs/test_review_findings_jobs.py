"""Review findings on the job layer (fresh-eyes bug hunt), each a minimal run on the fake engine.

Every test states the contract it checks (issue 2): no row lost or doubled in the output folder,
one-line errors with exit 2 for bad jobs/inputs, no silently wrong per-row sampling values, and
stats that count only the tokens the engine actually processed.
"""

import math

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import JobError
from llmbatch.jobs.fake_engine import FakeEngine
from llmbatch.jobs.stats import read_stats


@pytest.fixture(autouse=True)
def _helpers(jobkit):
    global make_job, write_prompts
    make_job, write_prompts = jobkit.make_job, jobkit.write_prompts


class RecordingEngine(FakeEngine):
    """The fake engine, remembering each request's SamplingParams by row index."""

    seen: dict = {}

    def generate(self, requests):
        def tap():
            for r in requests:
                RecordingEngine.seen[r.request_id] = r.sampling_params
                yield r
        return super().generate(tap())


def test_overwrite_with_fewer_shards_leaves_no_stale_rows(tmp_path, tiny_tokenizer_dir,
                                                          fake_engine_env):
    """A 4-shard run, then the same job overwritten as 2 shards: the folder must hold each row
    once. manifest.clear only removes the running shard's files, so shards 2 and 3 stay."""
    path = write_prompts(str(tmp_path / "in.parquet"), 20)
    out = str(tmp_path / "out")
    for i in range(4):
        run_job(make_job(tiny_tokenizer_dir, path, out, shard={"index": i, "count": 4}))
    for i in range(2):
        run_job(make_job(tiny_tokenizer_dir, path, out, shard={"index": i, "count": 2},
                         output={"mode": "overwrite"}))
    assert ds.dataset(out).to_table().column("id").to_pylist() == list(range(20))


def test_recover_keeps_other_shards_manifest_temporaries(tmp_path, tiny_tokenizer_dir,
                                                         fake_engine_env):
    """Array tasks start at different times: shard 1 starting must not delete shard 0's
    in-flight manifest temporary (its os.replace would then fail and kill shard 0)."""
    path = write_prompts(str(tmp_path / "in.parquet"), 6)
    out = tmp_path / "out"
    (out / "_manifest").mkdir(parents=True)
    other = out / "_manifest" / "_tmp-part-00000-00000.json.424242"
    other.write_text("{}")
    run_job(make_job(tiny_tokenizer_dir, path, str(out), shard={"index": 1, "count": 2}))
    assert other.exists()


def test_empty_input_path_list_is_a_one_line_error(tmp_path, tiny_tokenizer_dir,
                                                   fake_engine_env):
    """input.path: [] raised KeyError (pop from an empty set) -> 'internal error', exit 1."""
    with pytest.raises(JobError) as info:
        run_job(make_job(tiny_tokenizer_dir, [], str(tmp_path / "out")))
    assert info.value.exit_code == 2 and "input.path" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_empty_input_path_string_is_an_error(tmp_path, tiny_tokenizer_dir, fake_engine_env,
                                             monkeypatch):
    """input.path: "" became abspath("") = the working directory, silently read as input."""
    monkeypatch.chdir(tmp_path)
    write_prompts(str(tmp_path / "stray.parquet"), 3)
    with pytest.raises(JobError) as info:
        run_job(make_job(tiny_tokenizer_dir, "", str(tmp_path / "out")))
    assert info.value.exit_code == 2 and "input.path" in str(info.value)


def test_per_row_float_max_new_tokens_does_not_kill_the_job(tmp_path, tiny_tokenizer_dir,
                                                            fake_engine_env):
    """An int column with nulls is float64 after pandas; 3.0 reached SamplingParams as a float
    and the engine failed on it (exit 1, whole job lost)."""
    path = write_prompts(str(tmp_path / "in.parquet"), 3, max_new_tokens=[3.0, None, 2.0])
    out = str(tmp_path / "out")
    result = run_job(make_job(tiny_tokenizer_dir, path, out,
                              sampling={"per_row": ["max_new_tokens"], "ignore_eos": True}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["num_output_tokens"] for r in rows] == [3, 8, 2]
    assert result.exit_code == 0


def test_per_row_stop_string_is_not_split_into_characters(tmp_path, tiny_tokenizer_dir):
    """A string `stop` column value went into SamplingParams.stop as a str, i.e. one stop
    string per character. It must become ["##"] (or a row error)."""
    path = write_prompts(str(tmp_path / "in.parquet"), 2, stop=["##", None])
    out = str(tmp_path / "out")
    RecordingEngine.seen = {}
    run_job(make_job(tiny_tokenizer_dir, path, out, sampling={"per_row": ["stop"]}),
            engine_factory=RecordingEngine)
    rows = ds.dataset(out).to_table().to_pylist()
    assert rows[0]["finish_reason"] == "error" or RecordingEngine.seen[0].stop == ["##"]


def test_per_row_nan_temperature_is_a_row_error(tmp_path, tiny_tokenizer_dir,
                                                fake_engine_env):
    """NaN passes `temperature >= 0` checks (nan < 0 is False) and reaches the sampler."""
    path = write_prompts(str(tmp_path / "in.parquet"), 2, temperature=[math.nan, 0.5])
    out = str(tmp_path / "out")
    run_job(make_job(tiny_tokenizer_dir, path, out, sampling={"per_row": ["temperature"]}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert rows[0]["finish_reason"] == "error" and rows[1]["error"] is None


def test_stats_count_only_processed_prompt_tokens(tmp_path, tiny_tokenizer_dir,
                                                  fake_engine_env):
    """An over-long prompt never reaches the engine, yet its tokens were added to the stats'
    prompt_tokens: total tok/s inflated, prefix hit rate deflated."""
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["one two three", " ".join(["hello world"] * 60)]}),
                   path)
    out = str(tmp_path / "out")
    run_job(make_job(tiny_tokenizer_dir, path, out, engine={"max_model_len": 40}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert rows[1]["finish_reason"] == "error"
    stats = read_stats(out).to_pylist()[0]
    assert stats["prompt_tokens"] == rows[0]["num_prompt_tokens"]


def test_null_id_is_not_written_silently(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    """A null in id_column produced an ok row with id null: it cannot be joined back."""
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"uid": ["a", None], "prompt": ["one two", "cat dog"]}), path)
    out = str(tmp_path / "out")
    try:
        run_job(make_job(tiny_tokenizer_dir, path, out, input={"id_column": "uid"}))
    except JobError as exc:
        assert exc.exit_code == 2
        return
    rows = ds.dataset(out).to_table().to_pylist()
    assert rows[1]["finish_reason"] == "error"


def test_keep_columns_logprobs_clashes_with_output(tmp_path, tiny_tokenizer_dir,
                                                   fake_engine_env):
    """`logprobs` is an output column when logprobs are asked for, but is missing from the
    reserved names: two `logprobs` columns were written."""
    path = write_prompts(str(tmp_path / "in.parquet"), 2, logprobs=["x", "y"])
    with pytest.raises(JobError) as info:
        run_job(make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                         input={"keep_columns": ["logprobs"]}, sampling={"logprobs": 1}))
    assert info.value.exit_code == 2 and "logprobs" in str(info.value)


def test_keep_columns_duplicates_are_rejected_or_kept_once(tmp_path, tiny_tokenizer_dir,
                                                           fake_engine_env):
    path = write_prompts(str(tmp_path / "in.parquet"), 2, row=[0, 1])
    out = str(tmp_path / "out")
    try:
        run_job(make_job(tiny_tokenizer_dir, path, out, input={"keep_columns": ["row", "row"]}))
    except JobError as exc:
        assert exc.exit_code == 2
        return
    assert ds.dataset(out).to_table().column_names.count("row") == 1


def test_dictionary_encoded_prompt_column_is_accepted(tmp_path, tiny_tokenizer_dir,
                                                      fake_engine_env):
    """pandas categoricals land in Parquet as dictionary<string>: still a string column."""
    path = str(tmp_path / "in.parquet")
    prompts = pa.array(["one two", "cat dog", "one two"]).dictionary_encode()
    pq.write_table(pa.table({"prompt": prompts}), path, store_schema=True)
    out = str(tmp_path / "out")
    result = run_job(make_job(tiny_tokenizer_dir, path, out))
    assert result.exit_code == 0 and ds.dataset(out).count_rows() == 3


def test_shard_stats_memory_does_not_grow_with_rows():
    """ShardStats keeps every row's ttft/tpot in Python lists for the percentiles: ~64 bytes
    per row, gigabytes for a 10M-row shard. A bounded sketch (fixed log-spaced histogram or
    reservoir) keeps p50/p99 within a known error."""
    import tracemalloc

    from llmbatch.jobs.stats import ShardStats

    stats = ShardStats()
    row = dict(finish_reason="stop", num_prompt_tokens=5, num_cached_prompt_tokens=0,
               num_output_tokens=3, spec_accepted_tokens=0)
    for i in range(1000):
        stats.add(dict(row, ttft_s=0.001 * (i % 97), tpot_s=0.0001 * (i % 89)))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(100_000):
        stats.add(dict(row, ttft_s=0.001 * (i % 97) + 1e-9 * i, tpot_s=0.0001 * (i % 89)))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 1_000_000


def test_stepped_slurm_array_maps_tasks_to_distinct_shards():
    """--array=0-10:2 sets TASK_ID 0,2,..,10, COUNT=6, MIN=0, STEP=2. index = ID - MIN sends
    task 2 to shard 2 (should be 1) and tasks 6..10 out of range: shards 1, 3, 5 never run."""
    from llmbatch.io.sharding import resolve_shard

    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "6",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "10",
           "SLURM_ARRAY_TASK_STEP": "2"}
    try:
        shard = resolve_shard("auto", "auto", env)
    except JobError:
        return                      # refusing stepped arrays outright is also fine
    assert (shard.index, shard.count) == (1, 6)


# -- edge cases that hold today (guards) ------------------------------------------------------

def test_more_shards_than_rows_and_empty_input(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    path = write_prompts(str(tmp_path / "in.parquet"), 2)
    out = str(tmp_path / "out")
    for i in range(5):
        result = run_job(make_job(tiny_tokenizer_dir, path, out, shard={"index": i, "count": 5},
                                  output={"rows_per_part": 1}))
        assert result.num_rows == (1 if i < 2 else 0) and result.exit_code == 0
    assert ds.dataset(out).to_table().column("id").to_pylist() == [0, 1]
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    result = run_job(make_job(tiny_tokenizer_dir, empty, str(tmp_path / "out2")))
    # One empty part records the empty shard as done (and carries the output schema).
    part = str(tmp_path / "out2" / "part-00000-00000.parquet")
    assert (result.num_rows, result.exit_code, result.part_paths) == (0, 0, [part])
    assert pq.read_metadata(part).num_rows == 0


def test_resume_after_finish_keeps_error_count_and_exit_code(tmp_path, tiny_tokenizer_dir,
                                                             fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["one", None, "three"]}), path)
    job = make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"), output={"rows_per_part": 1})
    first = run_job(job)
    again = run_job(job)
    assert (first.num_rows_error, first.exit_code) == (1, 3)
    assert (again.num_rows_skipped, again.num_rows_error, again.exit_code) == (3, 1, 3)
    assert ds.dataset(str(tmp_path / "out")).count_rows() == 3
