"""The job file's vLLM sampling options allowed_token_ids, logit_bias, include_stop_str_in_output
and skip_special_tokens: they reach the engine (job-wide and per row), are checked against the
vocabulary once the model is loaded, and leave the config hash alone at their defaults."""

import os
import random

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import load
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError

BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}


def _spec(**sampling):
    return load(dict(BASE, sampling=sampling))


def test_job_values_and_row_overrides_reach_the_sampling_params():
    spec = _spec(allowed_token_ids=[4, 9], logit_bias={3: -2, "5": 1.5},
                 include_stop_str_in_output=True, skip_special_tokens=False,
                 per_row=["allowed_token_ids", "skip_special_tokens"])
    p = spec.sampling_params()
    assert (p.allowed_token_ids, p.logit_bias, p.include_stop_str_in_output,
            p.skip_special_tokens) == ([4, 9], {3: -2.0, 5: 1.5}, True, False)
    row = spec.sampling_params({"allowed_token_ids": [7], "skip_special_tokens": True})
    assert (row.allowed_token_ids, row.skip_special_tokens) == ([7], True)
    with pytest.raises(ValueError, match=r"allowed_token_ids must be a non-empty list of "
                                         r"integers >= 0 \(null: every token\), got \[\]"):
        spec.sampling_params({"allowed_token_ids": []})


def test_defaults_leave_the_hash_and_empty_bias_is_null():
    plain = _spec().config_hash(1)
    assert _spec(include_stop_str_in_output=False, skip_special_tokens=True,
                 allowed_token_ids=None, logit_bias={}).config_hash(1) == plain
    for changed in (dict(include_stop_str_in_output=True), dict(skip_special_tokens=False),
                    dict(allowed_token_ids=[1]), dict(logit_bias={1: 1.0})):
        assert _spec(**changed).config_hash(1) != plain
    # One bias, either key order: one hash.
    assert _spec(logit_bias={1: 1.0, 20: 2.0}).config_hash(1) == \
        _spec(logit_bias={20: 2.0, 1: 1.0}).config_hash(1)


@pytest.mark.parametrize("sampling, message", [
    (dict(allowed_token_ids=[]), "sampling.allowed_token_ids: an empty list allows no token; "
                                 "use null to allow every token (got [])"),
    (dict(allowed_token_ids=[3, -1]), "sampling.allowed_token_ids: token ids are >= 0, got -1 "
                                      "(got [3, -1])"),
    (dict(logit_bias={-4: 1.0}), "sampling.logit_bias: token ids are >= 0, got -4 "
                                 "(got {-4: 1.0})"),
])
def test_bad_values_are_one_line(sampling, message):
    with pytest.raises(InvalidJobError) as info:
        _spec(**sampling)
    assert info.value.message == message


def test_ids_past_the_vocabulary(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a b", "c d"],
                             "allowed_token_ids": [[5, vocab + 2], None]}), path)
    for key, value in (("allowed_token_ids", [1, vocab]), ("logit_bias", {vocab + 1: 2.0})):
        out = str(tmp_path / key)
        with pytest.raises(InvalidJobError) as info:
            run_job(jobkit.make_job(tiny_tokenizer_dir, path, out, sampling={key: value}))
        bad = vocab if key == "allowed_token_ids" else vocab + 1
        assert info.value.message == \
            f"sampling.{key}: {bad} is outside the vocabulary [0, {vocab})"
        assert not os.path.exists(os.path.join(out, "_manifest"))
    # Per row: that row's error; the other row runs.
    out = str(tmp_path / "per_row")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, path, out,
                                     sampling={"per_row": ["allowed_token_ids"]}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert rows[0]["error"] == f"allowed_token_ids: {vocab + 2} is outside the vocabulary " \
                               f"[0, {vocab})"
    assert (rows[1]["error"], result.num_rows_error) == (None, 1)


def test_a_column_of_the_wrong_type_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                               fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a b"], "skip_special_tokens": ["no"]}), path)
    with pytest.raises(InvalidInputError) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                                sampling={"per_row": ["skip_special_tokens"]}))
    assert info.value.message == ("sampling.per_row: column 'skip_special_tokens' is string; "
                                  "expected a bool column")


def test_runtime_engine_follows_the_rules_like_transformers(tmp_path, tiny_llama_dir, jobkit,
                                                           monkeypatch):
    """Greedy rows under a job-wide logit_bias and per-row allowed_token_ids equal
    transformers' generate(sequence_bias=..., bad_words_ids=every other id)."""
    pytest.importorskip("llmbatch.runtime.engine")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    vocab, eos = len(tok), tok.eos_token_id
    rng = random.Random(4)
    allowed = [[eos] + rng.sample(range(3, vocab), 6), None, [eos] + rng.sample(range(3, vocab), 3)]
    bias = {t: 6.0 for t in rng.sample(range(3, vocab), 3)}
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3, seed=9, allowed_token_ids=allowed)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, inp, out, engine={"kv_cache_blocks": 32, "device": "cpu"},
        sampling={"max_new_tokens": 6, "logit_bias": bias, "per_row": ["allowed_token_ids"]}))
    assert result.num_rows_ok == 3
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = ds.dataset(out).to_table().to_pylist()
    prompts = pq.read_table(inp).column("prompt").to_pylist()
    for row, prompt, ids_allowed in zip(rows, prompts, allowed):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        kwargs = {"sequence_bias": {(t,): b for t, b in bias.items()}}
        if ids_allowed:
            kwargs["bad_words_ids"] = [[t] for t in range(vocab) if t not in ids_allowed]
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, **kwargs)[0, ids.shape[1]:].tolist()
        ref = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert row["output_token_ids"] == ref
        if ids_allowed:
            assert set(row["output_token_ids"]) <= set(ids_allowed)
    assert any(t in bias for t in rows[1]["output_token_ids"])     # the bias binds


@pytest.mark.parametrize("bias", [{1: 2, "1": 3}, {"7": 1, 7.0: 2}])
def test_one_token_id_spelled_twice_in_logit_bias_is_refused(bias):
    """YAML sees two keys, pydantic made both the id: one bias was dropped silently."""
    first, second = list(bias)
    with pytest.raises(InvalidJobError, match=f"^sampling.logit_bias: token id {int(first)} is "
                                              f"given twice \\({first!r} and {second!r}\\)"):
        load(dict(BASE, sampling={"logit_bias": bias}))
    assert load(dict(BASE, sampling={"logit_bias": {1: 2, "2": 3}})).sampling.logit_bias == \
        {1: 2.0, 2: 3.0}
