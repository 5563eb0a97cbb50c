"""Why a request can never run on an engine: checked when it is admitted (Engine._admit), so a
bad row becomes that row's error result instead of failing a step for every request."""

from __future__ import annotations

from typing import Optional

from llmbatch.runtime.request import Request


def why_never_runs(engine, req: Request) -> Optional[str]:
    """A one-line reason `req` cannot run on `engine`, or None. Reads the engine's live ids,
    context limit, vocabulary size, KV pool size and its scheduler's own checks."""
    params = req.sampling_params
    max_model_len, vocab_size = engine.max_model_len, engine.vocab_size
    if req.request_id in engine._live_ids:
        return f"duplicate request id {req.request_id!r}: another request with it is running"
    if req.num_prompt_tokens >= max_model_len:
        return (f"prompt has {req.num_prompt_tokens} tokens; the model's context is "
                f"{max_model_len} tokens")
    lo, hi = min(req.prompt_token_ids), max(req.prompt_token_ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        return f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})"
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None and getattr(params, name) > vocab_size:
            return f"{name}={getattr(params, name)} exceeds the vocabulary size {vocab_size}"
    for name, ids in (("allowed_token_ids", params.allowed_token_ids),
                      ("logit_bias", params.logit_bias)):
        # The sampler indexes (rows, vocab) logits with them: an id past it must not get there.
        if ids and max(ids) >= vocab_size:
            return f"{name}: token id {max(ids)} is outside the vocabulary [0, {vocab_size})"
    if params.structured_outputs is not None:
        # Both would fight the grammar: a row all -inf emits a token the grammar refuses.
        if params.min_tokens > 0:
            return ("min_tokens does not apply with structured_outputs (the grammar decides "
                    "where the output ends); set min_tokens to 0")
        if params.allowed_token_ids:
            return ("allowed_token_ids and structured_outputs cannot be combined (the grammar "
                    "decides which tokens may come)")
    if params.allowed_token_ids and params.min_tokens > 0:
        # min_tokens bans the stop ids before its count: if they are all the allowed ids,
        # every logit is -inf and the sampler would emit an id that is not allowed. EOS counts
        # with ignore_eos too: min_tokens bans it either way (stop_rules.fold_stop_rules).
        stops = set(params.stop_token_ids) | set(engine.eos_token_ids)
        if set(params.allowed_token_ids) <= stops:
            return ("allowed_token_ids are all stop ids (EOS or stop_token_ids), which "
                    "min_tokens bans before its count: no token could be emitted")
    # The longest the sequence can grow (generation stops at max_model_len whatever
    # max_new_tokens is) must fit the KV pool alone, or the request would end up preempting
    # itself forever.
    longest = min(req.num_prompt_tokens + params.max_new_tokens, max_model_len)
    pool_tokens = engine.runner.num_kv_blocks * engine.config.block_size
    if longest > pool_tokens:
        return (f"the sequence can reach {longest} tokens (prompt + max_new_tokens, at most "
                f"max_model_len); the KV pool holds {pool_tokens} (raise kv_cache_blocks "
                f"or lower max_new_tokens)")
    return engine.scheduler.check_request(req)
