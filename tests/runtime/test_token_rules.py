"""allowed_token_ids and logit_bias (vLLM's): the logits edit row by row, and engine greedy
output equal to transformers' generate() with its own processors for the same rules
(sequence_bias for logit_bias, bad_words_ids = every id outside the allowed set), under every
scheduling setting; sampled rows stay inside their allowed set and are seeded."""

from __future__ import annotations

import random

import pytest
import torch

from llmbatch.runtime.request import Request
from llmbatch.runtime.request_checks import why_never_runs
from llmbatch.runtime.sampler import Sampler
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.token_rules import apply_token_rules
from tests.runtime.tiny_models import (ENGINE_SETTINGS, VOCAB, generate, make_model,
                                       make_prompts, new_engine,
                                       outputs_sync_async_and_small_batch)

MAX_NEW = 10
EOS = 2
_rng = random.Random(11)
# EOS is in every allowed set: transformers' bad_words_ids never bans the EOS id, so an
# allowed set without it would differ there (ours, like vLLM's, would ban it).
ALLOWED = [EOS] + _rng.sample(range(3, VOCAB), 12)
BIAS = {t: 8.0 for t in _rng.sample(range(3, VOCAB), 5)} | {EOS: -100.0}
# Per request (cycled).
RULES = [dict(allowed_token_ids=ALLOWED), dict(), dict(logit_bias=BIAS),
         dict(allowed_token_ids=ALLOWED[:6], logit_bias={ALLOWED[5]: 3.0, 77: 50.0})]


def test_rules_edit_only_their_rows():
    logits = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    params = [SamplingParams(allowed_token_ids=[1, 3], logit_bias={3: -2.5, 0: 1.0}),
              SamplingParams(logit_bias={2: 10.0})]
    out = apply_token_rules(logits, [0, 2], params)
    inf = float("-inf")
    assert out.tolist() == [[inf, 1.0, inf, 0.5], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 20.0, 11.0]]
    assert logits[0].tolist() == [0.0, 1.0, 2.0, 3.0]            # the input is not modified


def test_sampler_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    params = [SamplingParams(allowed_token_ids=[2, 3], logprobs=0), SamplingParams()]
    out = Sampler().sample(logits, params, [0, 0])
    assert out.token_ids == [3, 1]
    # Logprobs are of the raw logits (as with the penalties).
    want = torch.log_softmax(logits[0], dim=-1)[3].item()
    assert out.logprobs[0]["logprob"] == pytest.approx(want)


@pytest.mark.parametrize("bad", [dict(allowed_token_ids=[]), dict(allowed_token_ids=[1, -2]),
                                 dict(logit_bias={3: float("inf")}),
                                 dict(logit_bias={-1: 1.0})])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list|"
                                         "logit_bias must map token ids"):
        SamplingParams(**bad)


def hf_greedy(hf, prompt, rules):
    kwargs = {}
    if rules.get("logit_bias"):
        kwargs["sequence_bias"] = {(t,): b for t, b in rules["logit_bias"].items()}
    if rules.get("allowed_token_ids"):
        allowed = set(rules["allowed_token_ids"])
        kwargs["bad_words_ids"] = [[t] for t in range(VOCAB) if t not in allowed]
    with torch.no_grad():
        g = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                        eos_token_id=EOS, pad_token_id=0, **kwargs)
    got = g[0, len(prompt):].tolist()
    return got[: got.index(EOS) + 1] if EOS in got else got


@pytest.fixture(scope="module")
def hf_and_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules-llama")
    hf = make_model(path, arch="llama", eos_token_id=EOS)
    prompts = make_prompts(12, seed=5)
    rules = [RULES[i % len(RULES)] for i in range(len(prompts))]
    expected = [hf_greedy(hf, pr, ru) for pr, ru in zip(prompts, rules)]
    return path, prompts, rules, expected


SETTINGS = ENGINE_SETTINGS


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine_greedy_matches_transformers(hf_and_prompts, tokenizer, setting):
    path, prompts, rules, expected = hf_and_prompts
    engine = new_engine((path, tokenizer), **SETTINGS[setting])
    reqs = [Request(i, pr, SamplingParams(max_new_tokens=MAX_NEW, **ru))
            for i, (pr, ru) in enumerate(zip(prompts, rules))]
    results = generate(engine, reqs)
    got = [results[i].output_token_ids for i in range(len(prompts))]
    assert got == expected
    for out, ru in zip(got, rules):       # the rules bind (not vacuous on this model)
        if ru.get("allowed_token_ids"):
            assert set(out) <= set(ru["allowed_token_ids"])
    plain = [i for i, ru in enumerate(rules) if not ru]
    biased = [i for i, ru in enumerate(rules) if ru.get("logit_bias") == BIAS]
    assert all(any(t in BIAS for t in got[i]) for i in biased)
    assert any(set(got[i]) - set(ALLOWED) for i in plain)
    if "spec" in setting:
        assert sum(results[i].spec_accepted_tokens for i in range(len(prompts))) > 0
    if "preemption" in setting:
        assert engine.stats()["num_preemptions"] > 0


def test_sampled_rows_stay_allowed_and_are_seeded(hf_and_prompts, tokenizer):
    path, prompts, _, _ = hf_and_prompts
    params = [SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=40 + i,
                             allowed_token_ids=ALLOWED, logit_bias={ALLOWED[1]: 1.5})
              for i in range(len(prompts))]
    runs = outputs_sync_async_and_small_batch((path, tokenizer), prompts, params)
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert all(set(r) <= set(ALLOWED) for r in runs[0])
    assert len({t for r in runs[0] for t in r}) >= 4             # really sampled


def test_ids_past_the_vocabulary_are_the_request_s_error(hf_and_prompts, tokenizer):
    path, prompts, _, _ = hf_and_prompts
    engine = new_engine((path, tokenizer))
    for name, value in (("allowed_token_ids", [5, VOCAB]), ("logit_bias", {VOCAB + 3: 1.0})):
        req = Request("r", prompts[0], SamplingParams(**{name: value}))
        bad = VOCAB if name == "allowed_token_ids" else VOCAB + 3
        assert why_never_runs(engine, req) == \
            f"{name}: token id {bad} is outside the vocabulary [0, {VOCAB})"
    results = generate(engine, [Request("x", prompts[0],
                                        SamplingParams(allowed_token_ids=[VOCAB + 1]))])
    assert results["x"].finish_reason == "error"
