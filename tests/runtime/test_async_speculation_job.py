"""A job through run_job on the project's runtime (tiny Llama, CPU) with
engine.async_scheduling: true and speculative.method: ngram writes the rows of the same job
without speculation, synchronous: tokens, text, finish reason, errors and logprob ids, with
per-row lengths (so the batch shrinks below speculative.max_num_seqs and the engine switches
to drafting steps), a stop string, and a KV pool small enough to preempt."""

import pyarrow.dataset as ds
import pytest

COLUMNS = ["id", "output_text", "output_token_ids", "finish_reason", "error",
           "num_output_tokens"]
NUM_ROWS = 30


def _run(jobkit, model_dir, inp, out, engine, speculative):
    from llmbatch import run_job

    result = run_job(jobkit.make_job(
        model_dir, inp, out, engine=dict(engine, device="cpu"), speculative=speculative,
        sampling={"max_new_tokens": 40, "stop": [" the"], "logprobs": 1,
                  "per_row": ["max_new_tokens"]},
        output={"rows_per_part": 7}))
    assert (result.num_rows_ok, result.exit_code) == (NUM_ROWS, 0)
    table = ds.dataset(out).to_table()
    rows = {c: table.column(c).to_pylist() for c in COLUMNS}
    logprobs = table.column("logprobs").to_pylist()
    ids = [[(lp["token_id"], [t["token_id"] for t in lp["top"]]) for lp in row]
           for row in logprobs]
    values = [v for row in logprobs for lp in row
              for v in [lp["logprob"]] + [t["logprob"] for t in lp["top"]]]
    return rows, ids, values, result.extra["engine_stats"]


def test_async_speculative_job_writes_the_rows_of_a_sync_job(tmp_path, tiny_llama_dir, jobkit,
                                                             monkeypatch):
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), NUM_ROWS, seed=4,
                               max_new_tokens=[3 + (i * 7) % 23 for i in range(NUM_ROWS)])
    # max_model_len 80: a job refuses a pool that cannot hold one max_model_len sequence
    # (engine_limits.check_kv_pool); every row here stays well below 80 tokens.
    engine = {"kv_cache_blocks": 10, "block_size": 8, "max_num_seqs": 6,
              "max_num_batched_tokens": 32, "max_model_len": 80}
    want, want_ids, want_values, sync_stats = _run(jobkit, tiny_llama_dir, inp,
                                                   str(tmp_path / "sync"), engine, {})
    got, got_ids, got_values, stats = _run(
        jobkit, tiny_llama_dir, inp, str(tmp_path / "spec"),
        dict(engine, async_scheduling=True),
        {"method": "ngram", "num_tokens": 3, "max_num_seqs": 4})
    assert got == want
    assert got_ids == want_ids
    # The two engines batch rows differently, so float32 sums differ in the last bits.
    assert got_values == pytest.approx(want_values, abs=1e-4)
    assert stats["async_scheduling"] is True and sync_stats["async_scheduling"] is False
    assert stats["num_output_tokens"] == sync_stats["num_output_tokens"]
    # Drafts were verified (and some accepted), and the pool was tight enough to preempt.
    assert stats["num_spec_accepted_tokens"] > 0
    assert stats["num_preemptions"] > 0
