"""Review of prompt_logprobs (6b523a6), token rules (24ea1e9) and the output-text options
(e83abe2). The tests marked FINDING failed on the reviewed code (fixed since); the others cover
gaps."""

from __future__ import annotations

import pytest
import torch

from llmbatch.runtime import prompt_logprobs as prompt_logprobs_module
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.stop_checker import StopChecker
from llmbatch.runtime.stop_rules import apply_stop_rules, fold_stop_rules
from tests.runtime.tiny_models import VOCAB, generate, make_prompts, new_engine

EOS = 2   # llama_setup's EOS id


# -- FINDING 1: allowed_token_ids + min_tokens can emit an id outside the allowed set --------

@pytest.mark.parametrize("ignore_eos", [False, True])   # min_tokens bans EOS either way (v4)
@pytest.mark.parametrize("sampled", [False, True])
def test_allowed_ids_that_are_all_stop_tokens_under_min_tokens_never_emit_another_id(
        llama_setup, sampled, ignore_eos):
    """allowed_token_ids=[EOS] with min_tokens=2: the whitelist -infs every other id, then
    min_tokens -infs EOS, so the row is all -inf and argmax (greedy and Gumbel alike) picks
    id 0, which the row does not allow (README: "lets a row emit only those ids"). Either the
    request is refused (an error result, no tokens) or it emits only allowed ids; it must not
    emit id 0."""
    extra = dict(temperature=1.0, seed=3, top_p=0.9) if sampled else {}
    params = SamplingParams(max_new_tokens=4, allowed_token_ids=[EOS], min_tokens=2,
                            ignore_eos=ignore_eos, **extra)
    result = generate(new_engine(llama_setup), [Request("a", make_prompts(1, seed=1)[0],
                                                        params)])["a"]
    assert [t for t in result.output_token_ids if t not in (EOS,)] == []
    # The fix: such a request is refused (request_checks), as it can emit no allowed token.
    assert (result.finish_reason, result.error) == (
        "error", "allowed_token_ids are all stop ids (EOS or stop_token_ids), which min_tokens "
                 "bans before its count: no token could be emitted")


# -- FINDING 2: an error result carries prompt_logprobs [None] --------------------------------

def test_a_request_that_never_ran_has_no_prompt_logprobs(llama_setup):
    """A request refused by the engine (here prompt_logprobs above the vocabulary) reports
    logprobs None, but prompt_logprobs [None]: the shape of a scored 1-token prompt, for a
    prompt of many tokens that was never scored (the job's prompt_logprobs column gets [null]
    instead of null; tests/jobs/test_review_stop16_jobs.py)."""
    prompt = make_prompts(1, seed=2)[0]
    assert len(prompt) > 1
    result = generate(new_engine(llama_setup), [
        Request("x", prompt, SamplingParams(max_new_tokens=2, logprobs=1,
                                            prompt_logprobs=VOCAB + 1))])["x"]
    assert result.finish_reason == "error"
    assert result.logprobs is None
    assert result.prompt_logprobs is None


# -- FINDING 3: a stop string ignored under min_tokens matches a later token ----------------

class _CharTokenizer:
    """ids 10, 11, 12 -> 'x', 'y', 'z' (one character each)."""

    def decode(self, ids, skip_special_tokens=True, **kwargs):
        return "".join("xyz"[i - 10] for i in ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_before_min_tokens_is_not_matched_by_a_later_token(include):
    """stop=["x", "yyyy"], min_tokens=2: output token 0 is "x", ignored (below min_tokens, as
    vLLM's detokenizer skips the check). The next token "z" must only match a stop string that
    ends in its new text, but StopStringChecker looks back max(len(stop)) - 1 = 3 characters
    for every stop string, so the whole, earlier "x" matches and the request stops at token 1
    with output_text "" ("x" with include_stop_str_in_output). vLLM looks back per stop string
    (find(stop, 1 - new_chars - len(stop))) and goes on."""
    params = SamplingParams(stop=["x", "yyyy"], min_tokens=2, max_new_tokens=6,
                            include_stop_str_in_output=include)
    req = Request("r", [1, 2], params)
    req.stop_checker = StopChecker(_CharTokenizer(), params)
    fold_stop_rules(req, {99}, 100)
    reasons = []
    for token in (10, 12, 12, 12):          # "x", then "z" "z" "z": no new stop string
        req.append_output_token(token, 0.0)
        reasons.append(apply_stop_rules(req, {99}, 100))
    assert reasons == [None, None, None, None]
    assert req.output_token_ids == [10, 12, 12, 12]


# -- Gap coverage (passes): prompt_logprobs under draft-model speculation, many score slices,
#    tiny chunks, a 1-token prompt --------------------------------------------------------

def test_prompt_logprobs_with_draft_speculation_small_slices_and_chunks(llama_setup,
                                                                        monkeypatch):
    from transformers import LlamaForCausalLM

    path, _ = llama_setup
    hf = LlamaForCausalLM.from_pretrained(path).float().eval()
    # Score rows of one step span several slices and several requests per slice.
    monkeypatch.setattr(prompt_logprobs_module, "SLICE_ROWS", 3)
    prompts = make_prompts(6, seed=8) + [[7]]
    params = [SamplingParams(max_new_tokens=5, prompt_logprobs=2 if i % 2 else None)
              for i in range(len(prompts) - 1)] + [SamplingParams(max_new_tokens=2,
                                                                  prompt_logprobs=3)]
    baseline = generate(new_engine(llama_setup), [
        Request(i, pr, SamplingParams(max_new_tokens=pa.max_new_tokens))
        for i, (pr, pa) in enumerate(zip(prompts, params))])
    engine = new_engine(llama_setup, speculative_method="draft", draft_model=str(path),
                        num_speculative_tokens=3, speculative_max_num_seqs=64,
                        max_num_batched_tokens=5)
    results = generate(engine, [Request(i, pr, pa)
                                for i, (pr, pa) in enumerate(zip(prompts, params))])
    for i, (pr, pa) in enumerate(zip(prompts, params)):
        r = results[i]
        assert r.output_token_ids == baseline[i].output_token_ids
        if pa.prompt_logprobs is None:
            assert r.prompt_logprobs is None
            continue
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([pr])).logits[0].float(), dim=-1)
        got = r.prompt_logprobs
        assert got[0] is None and len(got) == len(pr)
        assert [e["token_id"] for e in got[1:]] == pr[1:]
        assert [e["logprob"] for e in got[1:]] == pytest.approx(
            [lp[p, pr[p + 1]].item() for p in range(len(pr) - 1)], abs=1e-4)
        assert [[t for t, _ in e["top"]] for e in got[1:]] == \
            [torch.topk(lp[p], pa.prompt_logprobs).indices.tolist() for p in range(len(pr) - 1)]
    assert results[len(prompts) - 1].prompt_logprobs == [None]     # a 1-token prompt
    # The target as its own draft: drafts were verified (and accepted) in these steps.
    assert engine.stats()["num_spec_accepted_tokens"] > 0
