"""Stop rules: when a request's generation ends, applied as its tokens arrive, and the output
text that ending leaves."""

from __future__ import annotations

from typing import Optional

from llmbatch.runtime.request import FinishReason, Request


def apply_stop_rules(req: Request, eos_token_ids: set[int],
                     max_model_len: int) -> Optional[FinishReason]:
    """Apply the stop rules to the tokens appended since the last call, in order: EOS (unless
    ignore_eos), stop token ids, stop strings, max_new_tokens, the context limit. Returns the
    reason the request ends, or None; tokens past the stop (speculative bonus tokens) are
    trimmed, with their logprobs and their count of accepted drafts."""
    params = req.sampling_params
    for i in range(req.num_stop_checked, len(req.output_token_ids)):
        token = req.output_token_ids[i]
        reason = None
        if i < params.min_tokens:
            # min_tokens: only the length rules end it within its first min_tokens tokens (the
            # sampler gave its stop ids -inf). A stop string that ends in this text is ignored,
            # as vLLM v1's detokenizer checks stop strings only once len(output) > min_tokens,
            # but the text is still followed for later matches. (Until output rules v4 the
            # min_tokens-th token's stop string counted: the text could end a token short.)
            if req.stop_checker.active:
                req.stop_checker.append(token, check=False)
            if i + 1 >= params.max_new_tokens or req.num_prompt_tokens + i + 1 >= max_model_len:
                reason = FinishReason.LENGTH
        elif (not params.ignore_eos or req.grammar is not None) and token in eos_token_ids:
            # A grammar allows EOS only where it ends, and ends there: ignore_eos or not.
            reason, req.stop_reason = FinishReason.STOP, token
        elif token in params.stop_token_ids:
            reason, req.stop_reason = FinishReason.STOP, token
        elif req.stop_checker.active and req.stop_checker.append(token):
            reason, req.stop_reason = FinishReason.STOP, req.stop_checker.matched
        elif i + 1 >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        elif req.num_prompt_tokens + i + 1 >= max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            # Tokens accepted after the stop (speculative bonus tokens) are dropped.
            extra = len(req.output_token_ids) - (i + 1)
            if extra:
                del req.output_token_ids[i + 1:]
                del req.all_token_ids[len(req.all_token_ids) - extra:]
                if req.output_logprobs is not None:
                    del req.output_logprobs[i + 1:]
                # The last dropped token is the target's own; the others were drafts.
                req.num_spec_accepted_tokens -= extra - 1
            req.num_stop_checked = i + 1
            return reason
    req.num_stop_checked = len(req.output_token_ids)
    return None


def fold_stop_rules(req: Request, eos_token_ids: set[int], max_model_len: int) -> None:
    """apply_stop_rules' token and length rules, folded once at admission for the engine's
    per-step fast path (Engine._finish_stopped): req.stop_token_set holds the ids that stop it
    (EOS unless ignore_eos, and stop_token_ids), req.max_output_tokens the output length at
    which it ends (max_new_tokens or the context limit). A new token below that length and not
    in the set, with no stop strings, is one apply_stop_rules would pass. Change both together."""
    params = req.sampling_params
    req.stop_token_set = frozenset(params.stop_token_ids).union(
        () if params.ignore_eos and req.grammar is None else eos_token_ids)
    req.max_output_tokens = min(params.max_new_tokens, max_model_len - req.num_prompt_tokens)
    req.min_tokens_banned = frozenset(params.stop_token_ids).union(eos_token_ids)


def output_text(req: Request, tokenizer) -> str:
    """The finished request's text, as vLLM's detokenizer leaves it. A stop string ends it and
    is cut, before or after it per include_stop_str_in_output (stop_checker.py). A stop token
    (EOS or stop_token_ids) keeps its id in output_token_ids, but its text is left out unless
    include_stop_str_in_output: otherwise a stop token's text would end output_text while a
    stop string's did not. skip_special_tokens is decode's argument: an EOS that is a special
    token shows as its text (e.g. "</s>") only with include_stop_str_in_output and
    skip_special_tokens=False; an ordinary token listed as EOS is a stop token like any other.

    vLLM's own rule (v1, vllm/v1/engine/detokenizer.py, BaseIncrementalDetokenizer.update):
    `if stop_terminated and not self.include_stop_str_in_output:` it drops the last id before
    detokenizing (stop_terminated: the engine core ended it on EOS or a stop_token_ids id),
    and returns without a stop-string check when stop_terminated; otherwise
    StopChecker.check_stop_strings cuts the text at the stop string's start, or at its end
    `if include_in_output` ("Truncate to end of stop string"). The detokenizer decodes with
    DecodeStream(skip_special_tokens=sampling_params.skip_special_tokens). The v0 StopChecker
    (vllm/engine/output_processor/stop_checker.py) agrees: it strips the EOS / stop token's
    new characters "unless explicitly specified" by include_stop_str_in_output."""
    params = req.sampling_params
    checker = req.stop_checker
    if checker is not None and checker.matched is not None:
        return checker.text
    ids = req.output_token_ids
    if req.finish_reason == FinishReason.STOP and ids and not params.include_stop_str_in_output:
        # No string matched, so a token stopped it: the last one (apply_stop_rules trims
        # anything after it).
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
