"""prompt_logprobs (vLLM's): per prompt token after the first, its logprob given the tokens before
it and the top-n, equal to transformers' log_softmax over one forward of the prompt, under
every scheduling setting (a prompt computed in chunks, preempted mid-prompt, async steps,
speculation), with no prefix-cache hit while scoring, and the output tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.step_inputs import StepInputs, _add_score_rows
from llmbatch.runtime.tp_worker import step_message
from tests.runtime.tiny_models import (ENGINE_SETTINGS, VOCAB, generate, make_model, make_prompts,
                                       new_engine)

MAX_NEW = 6
EOS = 2
KINDS = [dict(prompt_logprobs=0), dict(), dict(prompt_logprobs=3), dict(prompt_logprobs=2,
                                                                          logprobs=1)]


def reference(hf, prompt: list[int], k: int) -> list:
    """None, then per token p >= 1: (its logprob, the top-k ids, their logprobs)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    out = [None]
    for p in range(len(prompt) - 1):
        top = torch.topk(lp[p], k) if k else None
        out.append((lp[p, prompt[p + 1]].item(), top.indices.tolist() if k else [],
                    top.values.tolist() if k else []))
    return out


def assert_matches(got: list, want: list) -> None:
    assert len(got) == len(want) and got[0] is None
    for entry, (lp, ids, lps) in zip(got[1:], want[1:]):
        assert entry["logprob"] == pytest.approx(lp, abs=1e-4)
        assert [t for t, _ in entry["top"]] == ids
        assert [x for _, x in entry["top"]] == pytest.approx(lps, abs=1e-4)


@pytest.fixture(scope="module")
def hf_and_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("plp-llama")
    hf = make_model(path, arch="llama", eos_token_id=EOS)
    prompts = make_prompts(12, seed=8)      # most share a prefix: the cache is exercised
    kinds = [KINDS[i % len(KINDS)] for i in range(len(prompts))]
    want = [reference(hf, pr, ki["prompt_logprobs"]) if "prompt_logprobs" in ki else None
            for pr, ki in zip(prompts, kinds)]
    return path, prompts, kinds, want


def test_score_rows_of_a_chunk_skip_scored_tokens_and_the_last_position():
    req = Request("r", [10, 11, 12, 13, 14], SamplingParams(prompt_logprobs=1))
    s = StepInputs.empty()
    _add_score_rows(s, req, start=0, row_start=4, n=3)     # positions 0..2 at rows 4..6
    assert (s.score_rows, s.score_token_ids) == ([4, 5, 6], [11, 12, 13])
    req.prompt_logprobs += [{}] * 3                         # tokens 1..3 scored
    s = StepInputs.empty()
    _add_score_rows(s, req, start=0, row_start=0, n=5)     # recomputed after a preemption
    assert (s.score_rows, s.score_token_ids) == ([3], [14])   # position 4 samples instead
    assert req.prompt_logprobs_pending
    req.prompt_logprobs.append({})
    assert not req.prompt_logprobs_pending
    assert step_message(s).score_requests == []            # TP ranks get no Request objects


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
def test_engine_prompt_logprobs_equal_transformers(hf_and_prompts, tokenizer, setting):
    path, prompts, kinds, want = hf_and_prompts
    baseline = generate(new_engine((path, tokenizer)),
                        [Request(i, pr, SamplingParams(max_new_tokens=MAX_NEW))
                         for i, pr in enumerate(prompts)])
    engine = new_engine((path, tokenizer), **ENGINE_SETTINGS[setting])
    # The plain prompts first, in a run of their own: their blocks are in the prefix cache
    # when the scoring requests come, which must not hit them (a cached position has no
    # logits); a plain rerun afterwards does hit them.
    plain = [Request(("plain", i), pr, SamplingParams(max_new_tokens=MAX_NEW))
             for i, pr in enumerate(prompts)]
    generate(engine, plain)
    results = generate(engine, [Request(i, pr, SamplingParams(max_new_tokens=MAX_NEW, **ki))
                                for i, (pr, ki) in enumerate(zip(prompts, kinds))])
    again = generate(engine, [Request(("again", i), pr, SamplingParams(max_new_tokens=MAX_NEW))
                              for i, pr in enumerate(prompts)])
    for i, ki in enumerate(kinds):
        r = results[i]
        assert r.output_token_ids == baseline[i].output_token_ids    # outputs unchanged
        if want[i] is None:
            assert r.prompt_logprobs is None
            continue
        assert_matches(r.prompt_logprobs, want[i])
        assert r.num_cached_prompt_tokens == 0
    assert sum(r.num_cached_prompt_tokens for r in again.values()) > 0
    if "preemption" in setting:
        assert engine.stats()["num_preemptions"] > 0


def test_prompt_logprobs_beyond_the_vocabulary_are_the_request_s_error(hf_and_prompts,
                                                                       tokenizer):
    path, prompts, _, _ = hf_and_prompts
    results = generate(new_engine((path, tokenizer)),
                       [Request("x", prompts[0], SamplingParams(prompt_logprobs=VOCAB + 1))])
    assert results["x"].finish_reason == "error"
    assert results["x"].error == f"prompt_logprobs={VOCAB + 1} exceeds the vocabulary size " \
                                 f"{VOCAB}"
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0 or null, got -1"):
        SamplingParams(prompt_logprobs=-1)
