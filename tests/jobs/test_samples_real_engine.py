"""sampling.n on the project's own runtime (tiny random Llama on CPU): sample j of a row is
exactly the row sampled alone with seed derive_seed(row seed, j), and the samples after the
first read the prompt from the prefix cache instead of computing it again."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch.runtime.seed_mixing import derive_seed

N, ROWS, MAX_NEW, SEED = 3, 4, 5, 7


@pytest.mark.parametrize("ordering", ["prefix", "input"])
def test_samples_equal_single_runs_with_their_seeds(tmp_path, tiny_llama_dir, jobkit,
                                                    monkeypatch, ordering):
    pytest.importorskip("llmbatch.runtime.engine")
    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    engine = {"kv_cache_blocks": 64, "device": "cpu", "ordering": ordering}
    sampling = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": SEED}
    row_seeds = [derive_seed(SEED, i) for i in range(ROWS)]
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), ROWS, seed=3)
    out = str(tmp_path / "n3")
    result = run_job(jobkit.make_job(tiny_llama_dir, inp, out, engine=engine,
                                     sampling=dict(sampling, n=N)))
    assert (result.num_rows_ok, result.exit_code) == (ROWS, 0)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == \
        [(i, j) for i in range(ROWS) for j in range(N)]

    # Each sample alone: sample 0 is the n == 1 job; sample j a job whose rows bring the
    # derived seed in a column (a per-row seed is used as is).
    for j in range(N):
        single = str(tmp_path / f"alone{j}")
        seeded = inp
        if j:
            seeded = str(tmp_path / f"in{j}.parquet")
            pq.write_table(pq.read_table(inp).append_column(
                "seed", pa.array([derive_seed(s, j) for s in row_seeds], pa.int64())), seeded)
        run_job(jobkit.make_job(tiny_llama_dir, seeded, single, engine=engine,
                                sampling=dict(sampling, per_row=["seed"] if j else [])))
        alone = ds.dataset(single).to_table().column("output_token_ids").to_pylist()
        assert [r["output_token_ids"] for r in rows if r["sample_index"] == j] == alone
    assert len({tuple(r["output_token_ids"]) for r in rows}) > ROWS   # samples differ

    # Followers wait for sample 0's prompt blocks, then hit them: they compute only the tail
    # after the last full block (the planner's leader rule, in either ordering).
    for r in rows:
        if r["sample_index"]:
            assert r["num_cached_prompt_tokens"] == (r["num_prompt_tokens"] - 1) // 16 * 16
