"""Temperatures at the edges of float32 (sampling_params.py). The sampler divides float32
logits by T: below ~1e-37 that overflowed to inf and sampled pad / bos ids; above float32's
max T became inf, masked (-inf) logits became NaN, and argmax took them: a token outside
allowed_token_ids, EOS before min_tokens. Now T < 1e-5 samples greedily (vLLM's rule) and a T
over 3.4e38 is refused; a huge finite T keeps the token rules. Found by a helper's review."""

import pytest

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import GREEDY_BELOW_TEMPERATURE, SamplingParams
from tests.runtime.tiny_models import make_prompts, new_engine


def _tokens(engine, prompts, **params):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=8, seed=1, ignore_eos=True, **params))
            for i, p in enumerate(prompts)]
    return {r.request_id: r.output_token_ids for r in engine.generate(reqs)}


@pytest.fixture(scope="module")
def engine(llama_setup):
    return new_engine(llama_setup, max_num_seqs=4)


def test_a_tiny_temperature_is_greedy(engine):
    prompts = make_prompts(3, seed=41)
    greedy = _tokens(engine, prompts)
    for t in (1e-40, 1e-30, GREEDY_BELOW_TEMPERATURE / 2):
        assert SamplingParams(temperature=t).greedy
        assert _tokens(engine, prompts, temperature=t) == greedy, t
    assert not SamplingParams(temperature=GREEDY_BELOW_TEMPERATURE).greedy


@pytest.mark.parametrize("t", [1e39, float("inf"), float("nan"), -1.0])
def test_a_temperature_outside_float32_is_refused(t):
    with pytest.raises(ValueError, match="temperature must be >= 0 and fit a float32"):
        SamplingParams(temperature=t)


def test_a_huge_finite_temperature_keeps_the_token_rules(engine):
    prompts = make_prompts(3, seed=41)
    allowed = [40, 41, 42]
    got = _tokens(engine, prompts, temperature=3e38, allowed_token_ids=allowed)
    assert all(t in allowed for ids in got.values() for t in ids), got
    eos = engine.tokenizer.eos_token_id
    reqs = [Request(i, p, SamplingParams(max_new_tokens=8, seed=1, temperature=3e38,
                                         min_tokens=5, logit_bias={eos: 100.0}))
            for i, p in enumerate(prompts)]
    for r in engine.generate(reqs):       # EOS is pushed up but may not come before 5 tokens
        assert eos not in r.output_token_ids[:5], r.output_token_ids
