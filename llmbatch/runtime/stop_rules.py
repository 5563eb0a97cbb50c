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
        if i + 1 < params.min_tokens:
            # min_tokens: only the length rules end it before then (the sampler gave its stop
            # ids -inf; a stop string that ends in this text is ignored, as vLLM's
            # detokenizer does, but the text is still followed for later matches).
            if req.stop_checker.active:
                req.stop_checker.append(token, check=False)
            if req.num_prompt_tokens + i + 1 >= max_model_len:
                reason = FinishReason.LENGTH
        elif not params.ignore_eos and token in eos_token_ids:
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
        () if params.ignore_eos else eos_token_ids)
    req.max_output_tokens = min(params.max_new_tokens, max_model_len - req.num_prompt_tokens)


def output_text(req: Request, tokenizer) -> str:
    """The finished request's text. A stop string ends it and is cut (stop_checker.py); a stop
    token (EOS or stop_token_ids) keeps its id in output_token_ids, but its text is left out,
    as vLLM's detokenizer leaves out the last token of a stop-terminated request (unless
    include_stop_str_in_output, which the job file does not offer): otherwise a stop token's
    text ended output_text while a stop string's did not. An EOS that is a special token
    decodes to nothing anyway; one that is not (a model listing an ordinary token as EOS) is
    left out like any stop token."""
    checker = req.stop_checker
    if checker is not None and checker.matched is not None:
        return checker.text_before_stop
    ids = req.output_token_ids
    if req.finish_reason == FinishReason.STOP and ids:
        # No string matched, so a token stopped it: the last one (apply_stop_rules trims
        # anything after it).
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
