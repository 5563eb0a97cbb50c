"""min_tokens at its edges, as vLLM v1 has it (output rules v4):
- a stop string completed by the min_tokens-th output token is ignored: vLLM's detokenizer
  checks stop strings only once len(output) > min_tokens. It ended the output there, so its
  text could be one token shorter than with EOS or a stop token id, which can first end it as
  the (min_tokens + 1)-th token;
- EOS is banned below min_tokens with ignore_eos too (vLLM bans all stop ids; it was not);
- a stop token id past the vocabulary (the runtime API does not refuse it) is skipped by the
  ban: indexing with it raised IndexError and ended every request of the batch."""

import torch

from llmbatch.runtime.penalties import suppress_stop_tokens
from llmbatch.runtime.request import FinishReason, Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.stop_checker import StopChecker
from llmbatch.runtime.stop_rules import apply_stop_rules, fold_stop_rules, output_text

EOS = 2


def _run(tokenizer, token_ids, **params):
    """Feed token_ids one at a time through the stop rules; -> (ids kept, reason, text)."""
    req = Request("r", [5, 6], SamplingParams(max_new_tokens=len(token_ids), **params))
    req.stop_checker = StopChecker(tokenizer, req.sampling_params)
    fold_stop_rules(req, {EOS}, max_model_len=1000)
    for token in token_ids:
        req.output_token_ids.append(token)
        req.all_token_ids.append(token)
        reason = apply_stop_rules(req, {EOS}, max_model_len=1000)
        if reason is not None:
            req.finish_reason = reason            # as Scheduler.finish_request sets it
            return req.output_token_ids, reason, output_text(req, tokenizer)
    raise AssertionError("never stopped")


def test_a_stop_string_of_the_min_tokens_th_token_is_ignored(tokenizer):
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)     # noqa: E731
    x = ids("X")
    assert len(x) == 1 and len(ids("ab")) == 2
    tokens = ids("ab") + x + ids("cd") + x + ids("ef")
    # Without min_tokens the first X ends it; with min_tokens 3 (X is the 3rd token) the
    # second does, as a stop token id X would (it is first allowed as the 4th token).
    assert _run(tokenizer, tokens, stop=["X"])[1:] == (FinishReason.STOP, "ab")
    got, reason, text = _run(tokenizer, tokens, stop=["X"], min_tokens=3)
    assert (reason, text, len(got)) == (FinishReason.STOP, "abXcd", 6)
    by_id = _run(tokenizer, tokens, stop_token_ids=x, min_tokens=3)
    assert (by_id[1], by_id[2], len(by_id[0])) == (FinishReason.STOP, "abXcd", 6)
    # min_tokens 2: the X (3rd token) is past it and ends the output.
    assert _run(tokenizer, tokens, stop=["X"], min_tokens=2)[1:] == (FinishReason.STOP, "ab")


def test_min_tokens_equal_to_max_new_tokens_ends_on_length(tokenizer):
    ids = tokenizer.encode("abX", add_special_tokens=False)
    got, reason, _ = _run(tokenizer, ids, stop=["X"], min_tokens=len(ids))
    assert (reason, got) == (FinishReason.LENGTH, ids)


class _Req:
    def __init__(self, params):
        self.sampling_params = params
        self.num_prompt_tokens, self.grammar = 1, None


def test_eos_is_banned_below_min_tokens_with_ignore_eos_too():
    req = _Req(SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[7]))
    fold_stop_rules(req, {EOS}, max_model_len=100)
    assert req.stop_token_set == {7}                  # EOS does not stop it ...
    got = suppress_stop_tokens(torch.zeros(1, 8), [0], [req], [1])
    assert torch.isinf(got[0, [EOS, 7]]).all()        # ... but is banned below min_tokens
    assert int(torch.isinf(got).sum()) == 2


def test_a_stop_token_id_past_the_vocabulary_is_skipped_by_the_ban():
    req = _Req(SamplingParams(min_tokens=2, stop_token_ids=[100000, 3]))
    fold_stop_rules(req, {EOS}, max_model_len=100)
    got = suppress_stop_tokens(torch.zeros(1, 8), [0], [req], [0])
    assert torch.isinf(got[0, [EOS, 3]]).all() and int(torch.isinf(got).sum()) == 2
