"""sampling.prompt_logprobs in a job: a `prompt_logprobs` column (first element null, then per
prompt token its id, logprob and top-n), job-wide or per row, equal on the runtime engine to
transformers' log_softmax over the rendered prompt."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.io.writer import LOGPROBS_TYPE
from llmbatch.jobs.errors import InvalidJobError


def test_column_layout_and_per_row_values(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3, prompt_logprobs=[2, None, 0])
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                     sampling={"per_row": ["prompt_logprobs"]}))
    assert result.num_rows_ok == 3
    table = ds.dataset(out).to_table()
    assert table.column_names[-1] == "prompt_logprobs" and "logprobs" not in table.column_names
    assert table.schema.field("prompt_logprobs").type == LOGPROBS_TYPE
    rows = table.to_pylist()
    first = rows[0]["prompt_logprobs"]
    assert len(first) == rows[0]["num_prompt_tokens"] and first[0] is None
    assert [len(e["top"]) for e in first[1:]] == [2] * (len(first) - 1)
    assert rows[1]["prompt_logprobs"] is None                 # null cell: the job's (off)
    assert [e["top"] for e in rows[2]["prompt_logprobs"][1:]] == \
        [[]] * (rows[2]["num_prompt_tokens"] - 1)


def test_refusals(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2, prompt_logprobs=[1, 2])
    out = str(tmp_path / "out")
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                sampling={"prompt_logprobs": vocab + 1}))
    assert info.value.message == \
        f"sampling.prompt_logprobs={vocab + 1} exceeds the vocabulary size {vocab}"
    assert not os.path.exists(os.path.join(out, "_manifest"))
    # A kept input column of that name would be written twice.
    with pytest.raises(InvalidJobError, match="input.keep_columns: 'prompt_logprobs' clashes "
                                              "with an output column"):
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                input={"keep_columns": ["prompt_logprobs"]},
                                sampling={"per_row": ["prompt_logprobs"]}))


def test_runtime_engine_equals_transformers(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    pytest.importorskip("llmbatch.runtime.engine")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    path = str(tmp_path / "in.parquet")
    # The same prompt twice: the second copy would hit the first's cached blocks, but a row
    # scoring its prompt computes it all.
    prompts = ["the cat sat on the mat and looked at the dog", "a b c",
               "the cat sat on the mat and looked at the dog"]
    pq.write_table(pa.table({"prompt": prompts}), path)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, path, out, sampling={"max_new_tokens": 2, "prompt_logprobs": 2},
        engine={"kv_cache_blocks": 32, "device": "cpu", "max_num_batched_tokens": 16}))
    assert result.num_rows_ok == 3
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for row, prompt in zip(ds.dataset(out).to_table().to_pylist(), prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        got = row["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ids) == row["num_prompt_tokens"]
        assert [e["token_id"] for e in got[1:]] == ids[1:]
        assert [e["logprob"] for e in got[1:]] == \
            pytest.approx([lp[p, ids[p + 1]].item() for p in range(len(ids) - 1)], abs=1e-4)
        assert [[t["token_id"] for t in e["top"]] for e in got[1:]] == \
            [torch.topk(lp[p], 2).indices.tolist() for p in range(len(ids) - 1)]
        assert row["num_cached_prompt_tokens"] == 0
