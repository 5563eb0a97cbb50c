"""A stop token's id stays in output_token_ids, its text is not in output_text (vLLM v1's
default), like a stop string's text; it used to end output_text."""

from __future__ import annotations

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import generate, make_prompts, new_engine


def _free_run(llama_setup, **params):
    """A 12-token run of one prompt and an ordinary (non-special) token of it with text,
    first seen at output index >= 2."""
    prompt = make_prompts(1, seed=5)[0]
    free = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, **params))])[0]
    ids = free.output_token_ids
    _, tok = llama_setup
    stop_at = next(t for i, t in enumerate(ids) if i >= 2 and t not in ids[:i]
                   and t not in tok.all_special_ids and tok.decode([t]))
    return prompt, free, stop_at, ids.index(stop_at)


def test_stop_token_text_is_left_out_and_its_id_kept(llama_setup):
    _, tok = llama_setup
    prompt, free, stop_at, first = _free_run(llama_setup, logprobs=1)
    got = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at], logprobs=1))])[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_at)
    assert got.output_token_ids == free.output_token_ids[:first + 1]
    assert got.output_text == tok.decode(free.output_token_ids[:first])
    assert got.output_text != tok.decode(got.output_token_ids)   # the token has text
    # Logprobs keep one entry per output token, the stop token's included.
    assert [e["token_id"] for e in got.logprobs] == got.output_token_ids


def test_stop_token_text_is_left_out_with_stop_strings_active(llama_setup):
    # With stop strings the text comes from the incremental detokenizer; a stop token that
    # ends the request first is left out there too.
    _, tok = llama_setup
    prompt, free, stop_at, first = _free_run(llama_setup)
    got = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at],
        stop=["never in this output \u2603"]))])[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_at)
    assert got.output_text == tok.decode(free.output_token_ids[:first])


def test_an_ordinary_eos_token_is_left_out_like_a_stop_token(llama_setup):
    _, tok = llama_setup
    prompt, free, stop_at, first = _free_run(llama_setup)
    engine = new_engine(llama_setup)
    engine.eos_token_ids = set(engine.eos_token_ids) | {stop_at}   # a model listing it as EOS
    got = generate(engine, [Request(0, prompt, SamplingParams(max_new_tokens=12))])[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_at)
    assert got.output_token_ids == free.output_token_ids[:first + 1]
    assert got.output_text == tok.decode(free.output_token_ids[:first])


def test_length_finish_keeps_the_last_tokens_text(llama_setup):
    _, tok = llama_setup
    prompt, free, _, _ = _free_run(llama_setup)
    assert free.finish_reason == "length"
    assert free.output_text == tok.decode(free.output_token_ids, skip_special_tokens=True)
