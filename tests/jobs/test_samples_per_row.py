"""sampling.n (vLLM's n): each input row gives n output rows, keyed (id, sample_index), with
exactly-once commits and resume counting input rows. Runs on the deterministic fake engine,
whose sampled tokens depend on the request's seed."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError, ResumeError
from llmbatch.jobs.row_samples import DuplicateSample, RowSamples
from llmbatch.jobs.stats import read_stats
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.seed_mixing import derive_seed

SAMPLED = {"temperature": 1.0, "max_new_tokens": 6, "seed": 7}


def _job(jobkit, tok_dir, inp, out, n, **sections):
    sampling = dict(SAMPLED, **({"n": n} if n is not None else {}), **sections.pop("sampling", {}))
    return jobkit.make_job(tok_dir, inp, out, sampling=sampling, **sections)


def test_n_samples_are_rows_keyed_by_id_and_sample_index(tmp_path, tiny_tokenizer_dir, jobkit,
                                                         fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 10, row=list(range(10)))
    one = run_job(_job(jobkit, tiny_tokenizer_dir, inp, str(tmp_path / "one"), None,
                       input={"keep_columns": ["row"]}))
    out = str(tmp_path / "three")
    result = run_job(_job(jobkit, tiny_tokenizer_dir, inp, out, 3,
                          input={"keep_columns": ["row"]}, output={"rows_per_part": 4}))
    table = ds.dataset(out).to_table()
    assert table.column_names[:3] == ["row", "id", "sample_index"]
    assert table.schema.field("sample_index").type == pa.int32()
    assert table.column("id").to_pylist() == [i for i in range(10) for _ in range(3)]
    assert table.column("row").to_pylist() == [i for i in range(10) for _ in range(3)]
    assert table.column("sample_index").to_pylist() == [0, 1, 2] * 10
    # Counts are of input rows; the parts hold 3 output rows per input row.
    assert (result.num_rows, result.num_rows_ok, result.num_rows_error) == (10, 10, 0)
    assert [pq.read_metadata(p).num_rows for p in result.part_paths] == [12, 12, 6]
    entries = [json.load(open(os.path.join(out, "_manifest", n)))
               for n in sorted(os.listdir(os.path.join(out, "_manifest")))]
    assert [(e["num_rows"], e["num_output_rows"], e["ids"]) for e in entries] == \
        [(4, 12, [0, 1, 2, 3]), (4, 12, [4, 5, 6, 7]), (2, 6, [8, 9])]
    stats = read_stats(out).to_pylist()[0]
    assert (stats["rows_total"], stats["rows_ok"], stats["rows_error"]) == (10, 10, 0)
    assert stats["output_tokens"] == sum(table.column("num_output_tokens").to_pylist())
    # Sample 0 is the n == 1 job's row (same seed); the other samples have seeds of their own.
    single = ds.dataset(str(tmp_path / "one")).to_table()
    assert "sample_index" not in single.column_names
    rows = table.to_pylist()
    firsts = [r["output_token_ids"] for r in rows if r["sample_index"] == 0]
    assert firsts == single.column("output_token_ids").to_pylist()
    differing = sum(len({tuple(r["output_token_ids"]) for r in rows[3 * i:3 * i + 3]}) > 1
                    for i in range(10))
    assert differing >= 5
    assert one.num_rows_ok == 10


def test_sample_seeds():
    params = SamplingParams(temperature=1.0, seed=123)
    assert RowSamples.sample_params(params, 0) is params
    assert [RowSamples.sample_params(params, j).seed for j in (1, 2)] == \
        [derive_seed(123, 1), derive_seed(123, 2)]
    assert RowSamples.sample_params(params, 1).temperature == 1.0


def test_row_samples_ids_and_gathering():
    samples = RowSamples(2)
    made = samples.requests(5, {"id": "x"}, [1, 2], SamplingParams(temperature=1.0, seed=1),
                            lambda rid, ids, p: (rid, ids, p.seed))
    assert [m[0] for m in made] == [10, 11]
    assert samples.row_of(11) == {"id": "x"} and samples.row_of(12) is None
    assert samples.row_of("10") is None
    assert samples.add_result(11, lambda r: dict(r, out="b")) is None
    with pytest.raises(DuplicateSample):
        samples.add_result(11, lambda r: r)
    done = samples.add_result(10, lambda r: dict(r, out="a"))
    assert done == (5, [{"id": "x", "sample_index": 0, "out": "a"},
                        {"id": "x", "sample_index": 1, "out": "b"}])
    assert len(samples) == 0
    with pytest.raises(ValueError):
        RowSamples(0)
    # n == 1: the ids are the row indices and the rows get no sample_index key (a kept input
    # column may have that name).
    one = RowSamples(1)
    assert [m[0] for m in one.requests(7, {"id": 7, "sample_index": "kept"}, [1],
                                       SamplingParams(), lambda rid, ids, p: (rid,))] == [7]
    assert one.add_result(7, lambda r: r) == (7, [{"id": 7, "sample_index": "kept"}])


def test_an_error_row_has_n_error_rows_and_counts_once(tmp_path, tiny_tokenizer_dir, jobkit,
                                                       fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["one two", " ".join(["hello world"] * 400), "cat"]}),
                   path)
    out = str(tmp_path / "out")
    result = run_job(_job(jobkit, tiny_tokenizer_dir, path, out, 2,
                          engine={"max_model_len": 128}))
    table = ds.dataset(out).to_table().to_pylist()
    assert [(r["id"], r["sample_index"], r["finish_reason"] == "error") for r in table] == \
        [(0, 0, False), (0, 1, False), (1, 0, True), (1, 1, True), (2, 0, False),
         (2, 1, False)]
    assert table[2]["error"] == table[3]["error"] and "128" in table[2]["error"]
    assert (result.num_rows_ok, result.num_rows_error, result.exit_code) == (2, 1, 3)
    stats = read_stats(out).to_pylist()[0]
    assert (stats["rows_ok"], stats["rows_error"]) == (2, 1)


def test_greedy_n_is_refused(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = _job(jobkit, tiny_tokenizer_dir, inp, str(tmp_path / "out"), 2,
               sampling={"temperature": 0.0})
    with pytest.raises(InvalidJobError, match=r"sampling.n: 2 samples of a greedy job "
                                              r"\(temperature 0\) are all the same"):
        run_job(job)
    assert not os.path.exists(str(tmp_path / "out"))
    with pytest.raises(InvalidJobError, match="sampling.n"):
        run_job(_job(jobkit, tiny_tokenizer_dir, inp, str(tmp_path / "out"), 0))


def test_n_is_hashed_only_above_one(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    out = str(tmp_path / "out")
    plain = run_job(_job(jobkit, tiny_tokenizer_dir, inp, out, None))
    explicit = run_job(_job(jobkit, tiny_tokenizer_dir, inp, out, 1))
    assert explicit.config_hash == plain.config_hash and explicit.num_rows_skipped == 4
    with pytest.raises(ResumeError, match=r"sampling.n 1 -> 2"):
        run_job(_job(jobkit, tiny_tokenizer_dir, inp, out, 2))


def _cli(args, jobkit, **env):
    import llmbatch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    full = dict(os.environ, PYTHONPATH=repo, LLMBATCH_ENGINE_FACTORY=jobkit.fake_engine, **env)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "LLMBATCH_TEST_CRASH_AT"):
        full.pop(name, None) if name not in env else None
    return subprocess.run([sys.executable, "-m", "llmbatch.cli", *args], env=full,
                          capture_output=True, text=True, timeout=180)


def test_killed_run_resumes_to_the_uninterrupted_output(tmp_path, tiny_tokenizer_dir, jobkit,
                                                        fake_engine_env):
    import yaml

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 20)
    reference = str(tmp_path / "ref")
    run_job(_job(jobkit, tiny_tokenizer_dir, inp, reference, 3, output={"rows_per_part": 3}))
    out = str(tmp_path / "out")
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(
        _job(jobkit, tiny_tokenizer_dir, inp, out, 3, output={"rows_per_part": 3})))
    crashed = _cli(["run", str(job_path), "--progress", "none"], jobkit,
                   LLMBATCH_TEST_CRASH_AT="after_rename:2")
    assert crashed.returncode == -9, crashed.stderr
    assert len(os.listdir(os.path.join(out, "_manifest"))) == 2
    result = run_job(str(job_path))
    assert (result.num_rows_skipped, result.num_rows_ok) == (6, 20)
    got = ds.dataset(out).to_table()
    assert got.num_rows == 60
    # Timings and the prefix-cache counts depend on the run; the outputs may not.
    compared = ["id", "sample_index", "output_text", "output_token_ids", "finish_reason",
                "error", "num_prompt_tokens", "num_output_tokens"]
    want = ds.dataset(reference).to_table().select(compared)
    assert got.select(compared).equals(want)
    # A part whose file lost rows is produced again: the check reads num_output_rows.
    part = os.path.join(out, "part-00000-00001.parquet")
    pq.write_table(pq.read_table(part).slice(0, 3), part)
    again = run_job(str(job_path))
    assert again.num_rows_skipped == 3
    assert ds.dataset(out).to_table().select(compared).equals(want)
    merged = _cli(["merge", out, "-o", str(tmp_path / "all.parquet")], jobkit)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == \
        f"merged 7 parts, 20 rows (60 output rows) -> {tmp_path / 'all.parquet'}"
    assert pq.read_metadata(str(tmp_path / "all.parquet")).num_rows == 60


def test_n_is_not_a_per_row_key():
    from llmbatch.api import load

    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"},
           "sampling": {"temperature": 1.0, "per_row": ["n"]}}
    with pytest.raises(InvalidJobError, match=r"sampling.per_row: 'n' is a job-wide sampling "
                                              r"key, not a per-row one; per-row keys are "
                                              r"max_new_tokens, "):
        load(job)
