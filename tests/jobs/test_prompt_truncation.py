"""sampling.truncate_prompt_tokens (vLLM's): a row keeps only the last k tokens of its rendered
prompt instead of becoming an error row for its length; -1 keeps max_model_len - 1."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import load
from llmbatch.jobs.errors import InvalidJobError

LONG = " ".join(["hello world"] * 400)


@pytest.fixture
def prompts(tmp_path):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["one two", LONG, "cat dog"]}), path)
    return path


def _run(jobkit, tok_dir, inp, out, keep, max_model_len=128):
    sampling = {"max_new_tokens": 4}
    if keep is not None:
        sampling["truncate_prompt_tokens"] = keep
    return run_job(jobkit.make_job(tok_dir, inp, out, sampling=sampling,
                                   engine={"max_model_len": max_model_len}))


def test_long_prompts_keep_their_last_tokens(tmp_path, prompts, tiny_tokenizer_dir, jobkit,
                                             fake_engine_env):
    plain = _run(jobkit, tiny_tokenizer_dir, prompts, str(tmp_path / "plain"), None)
    assert (plain.num_rows_ok, plain.num_rows_error) == (2, 1)
    lengths = ds.dataset(str(tmp_path / "plain")).to_table() \
        .column("num_prompt_tokens").to_pylist()
    for keep, want_long in ((50, 50), (-1, 127)):
        out = str(tmp_path / f"keep{keep}")
        result = _run(jobkit, tiny_tokenizer_dir, prompts, out, keep)
        assert (result.num_rows_ok, result.num_rows_error) == (3, 0)
        table = ds.dataset(out).to_table()
        assert table.column("num_prompt_tokens").to_pylist() == \
            [lengths[0], want_long, lengths[2]]
        assert table.column("error").to_pylist() == [None] * 3
        assert result.config_hash != plain.config_hash


def test_truncation_is_left_and_after_the_template(tmp_path, prompts, tiny_llama_dir, jobkit,
                                                  monkeypatch):
    """On the runtime engine: the row's greedy tokens are transformers' generate() on the last
    50 ids of the rendered (chat-templated) prompt."""
    pytest.importorskip("llmbatch.runtime.engine")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_llama_dir, prompts, out,
                                     sampling={"max_new_tokens": 4, "truncate_prompt_tokens": 50},
                                     engine={"kv_cache_blocks": 32, "device": "cpu",
                                             "max_model_len": 128}))
    assert result.num_rows_ok == 3
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    text = tok.apply_chat_template([{"role": "user", "content": LONG}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -50:]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False)[0, 50:].tolist()
    row = ds.dataset(out).to_table().to_pylist()[1]
    assert row["num_prompt_tokens"] == 50
    assert row["output_token_ids"] == ref[:len(row["output_token_ids"])]
    assert len(row["output_token_ids"]) >= 1


def test_a_value_that_keeps_too_much_is_refused_at_start(tmp_path, prompts, tiny_tokenizer_dir,
                                                        jobkit, fake_engine_env):
    out = str(tmp_path / "out")
    with pytest.raises(InvalidJobError) as info:
        _run(jobkit, tiny_tokenizer_dir, prompts, out, 128)
    assert info.value.message == (
        "sampling.truncate_prompt_tokens=128 keeps prompts of max_model_len 128 tokens or "
        "more, which leave no room for an output token; set it below 128, or -1 for the "
        "longest prompt that runs")
    assert not os.path.exists(os.path.join(out, "_manifest"))


@pytest.mark.parametrize("value", [0, -2])
def test_bad_values(value):
    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"},
           "sampling": {"truncate_prompt_tokens": value}}
    with pytest.raises(InvalidJobError, match=r"sampling.truncate_prompt_tokens: must be -1 "
                                              r"\(the longest prompt that runs\) or a number of "
                                              r"tokens >= 1, or null \(off\)"):
        load(job)
