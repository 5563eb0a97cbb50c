"""Review of sampling.prompt_logprobs in a job (8a4aa26). FINDING: fails on the reviewed code."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job


def test_error_row_has_a_null_prompt_logprobs_cell(tmp_path, tiny_llama_dir, jobkit,
                                                   monkeypatch):
    """A per-row logprobs / prompt_logprobs above the vocabulary is that row's error. Its
    `logprobs` cell is null, but its `prompt_logprobs` cell is [null]: the runtime engine's
    error result carries the Request's initial [None], which prompt_logprobs_to_rows keeps.
    [null] is the value of a scored 1-token prompt; this row has many tokens, none scored."""
    pytest.importorskip("llmbatch.runtime.engine")
    from transformers import AutoTokenizer

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    vocab = len(AutoTokenizer.from_pretrained(tiny_llama_dir))
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["the cat sat", "the dog sat"],
                             "prompt_logprobs": [1, vocab + 1],
                             "logprobs": [None, vocab + 1]}), path)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, path, out,
        sampling={"max_new_tokens": 1, "per_row": ["prompt_logprobs", "logprobs"]},
        engine={"kv_cache_blocks": 32, "device": "cpu"}))
    assert (result.num_rows_ok, result.num_rows_error) == (1, 1)
    ok, bad = ds.dataset(out).to_table().to_pylist()
    assert ok["finish_reason"] != "error"
    assert ok["prompt_logprobs"][0] is None
    assert len(ok["prompt_logprobs"]) == ok["num_prompt_tokens"] > 1
    assert bad["finish_reason"] == "error"
    # (logprobs is checked first; either one alone makes the same error row)
    assert bad["error"] == f"logprobs={vocab + 1} exceeds the vocabulary size {vocab}"
    assert bad["logprobs"] is None
    assert bad["prompt_logprobs"] is None
