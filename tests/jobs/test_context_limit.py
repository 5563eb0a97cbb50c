"""A row runs when its prompt leaves room for one output token and stops at max_model_len with
finish_reason "length" (vLLM's offline LLM.generate); a prompt of max_model_len tokens or more
is an error row. Rows with prompt + max_new_tokens > max_model_len used to be error rows
('prompt has 101 tokens, more than max_model_len (128) - max_new_tokens (40) = 88')."""

import random

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

WORDS = "the a cat dog sat on mat red blue green one two three what is why how and or".split()


def prompt_of(tok, num_tokens: int, seed: int) -> str:
    """A prompt whose chat-rendered form (what the job feeds the engine) has num_tokens tokens:
    random words, then single 'a's (one token each)."""
    def count(text):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return len(tok(rendered, add_special_tokens=False)["input_ids"])

    rng = random.Random(seed)
    words = []
    while count(" ".join(words + ["green"])) < num_tokens - 8:
        words.append(rng.choice(WORDS))
    while count(" ".join(words)) < num_tokens:
        words.append("a")
    assert count(" ".join(words)) == num_tokens
    return " ".join(words)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """(tokenizer, greedy transformers continuation of a prompt text for n tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()

    def generate(prompt: str, n: int) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    return tok, generate


@pytest.mark.parametrize("engine", [
    {},
    # Two 101-token prompts get in (7 blocks each) but cannot both grow to 128 tokens (8
    # each): one is preempted and recomputed (checked once: one preemption with ngram).
    {"kv_cache_blocks": 15, "block_size": 16},
], ids=["default", "tight_kv_pool"])
@pytest.mark.parametrize("speculative", [{}, {"method": "ngram", "num_tokens": 4}],
                         ids=["plain", "ngram"])
def test_long_prompts_run_to_the_context_limit(tmp_path, tiny_llama_dir, jobkit, monkeypatch,
                                               reference, engine, speculative):
    pytest.importorskip("llmbatch.runtime.engine")
    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    tok, generate = reference
    prompts = [prompt_of(tok, 101, seed=s) for s in range(3)] + [prompt_of(tok, 127, seed=3)]
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": prompts}), inp)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, inp, out, sampling={"max_new_tokens": 40},
        engine={"device": "cpu", "max_model_len": 128, **engine},
        speculative=speculative or {"method": "none"}))
    assert (result.exit_code, result.num_rows_ok) == (0, 4)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["num_prompt_tokens"] for r in rows] == [101, 101, 101, 127]
    assert [(r["finish_reason"], r["num_output_tokens"]) for r in rows] == \
        [("length", 27)] * 3 + [("length", 1)]
    for prompt, row in zip(prompts, rows):
        assert row["output_token_ids"] == generate(prompt, row["num_output_tokens"])


def test_prompt_of_max_model_len_tokens_is_an_error_row(tmp_path, tiny_llama_dir, jobkit,
                                                        monkeypatch, reference):
    pytest.importorskip("llmbatch.runtime.engine")
    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    tok, _ = reference
    prompts = [prompt_of(tok, 128, seed=4), prompt_of(tok, 140, seed=5), "one two"]
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": prompts}), inp)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_llama_dir, inp, out, sampling={"max_new_tokens": 4},
                                     engine={"device": "cpu", "max_model_len": 128}))
    assert (result.exit_code, result.num_rows_ok, result.num_rows_error) == (3, 1, 2)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["error"] for r in rows] == [
        "prompt has 128 tokens, at least max_model_len (128): no room for an output token",
        "prompt has 140 tokens, at least max_model_len (128): no room for an output token",
        None]
    assert [r["finish_reason"] for r in rows] == ["error", "error", rows[2]["finish_reason"]]
    assert rows[2]["finish_reason"] in ("stop", "length")
