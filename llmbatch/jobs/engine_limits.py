"""Rows and sampling values checked against the loaded engine's limits: its context length, its
vocabulary and its KV pool, known only once the model is loaded (no torch).

The job's own values apply to every row (a row without a per-row override takes them), so one
that no row could run with is a job error (InvalidJobError, exit 2, before any row runs and
nothing written), not one error row per prompt. Per-row overrides stay row errors. The same
holds for a KV pool too small for a sequence of max_model_len tokens (check_kv_pool) and a
job-wide structured_outputs spec the engine cannot compile (check_structured_outputs).
"""

from __future__ import annotations

from typing import Optional

from llmbatch.jobs.errors import InvalidJobError


def engine_vocab_size(engine) -> Optional[int]:
    """The runtime engine's vocabulary (the model's vocab_size: the ids it can emit); an
    engine without one (a custom factory's) is judged by its tokenizer."""
    size = getattr(engine, "vocab_size", None)
    if size is None and getattr(engine, "tokenizer", None) is not None:
        size = len(engine.tokenizer)
    return int(size) if size else None


def _out_of_vocab(token_ids, vocab_size: Optional[int]) -> Optional[int]:
    if vocab_size is None:
        return None
    return next((t for t in token_ids if t >= vocab_size), None)


def check_sampling(sampling, max_model_len: int, vocab_size: Optional[int]) -> None:
    """The job's sampling section against the engine (raises InvalidJobError, one line).

    A value that is also a per_row column is only the fallback of rows without their own:
    rows that bring one that fits must run, so it is judged per row (row_error, the engine)."""
    # max_new_tokens is not checked against max_model_len: a larger one only means the row
    # stops at the context limit (finish_reason "length"), as in vLLM's offline LLM.generate.
    per_row = set(sampling.per_row)
    keep = sampling.truncate_prompt_tokens
    if keep is not None and keep >= max_model_len:
        raise InvalidJobError(f"sampling.truncate_prompt_tokens={keep} keeps prompts of "
                              f"max_model_len {max_model_len} tokens or more, which leave no "
                              f"room for an output token; set it below {max_model_len}, or "
                              f"-1 for the longest prompt that runs")
    if vocab_size is None:
        return
    for key in ("logprobs", "prompt_logprobs"):
        value = getattr(sampling, key)
        if key not in per_row and value is not None and value > vocab_size:
            raise InvalidJobError(f"sampling.{key}={value} exceeds the vocabulary size "
                                  f"{vocab_size}")
    for key, ids in (("stop_token_ids", sampling.stop_token_ids),
                     ("allowed_token_ids", None if "allowed_token_ids" in per_row
                      else sampling.allowed_token_ids),
                     ("logit_bias", sampling.logit_bias)):
        bad = _out_of_vocab(ids or (), vocab_size)
        if bad is not None:
            raise InvalidJobError(f"sampling.{key}: {bad} is outside the vocabulary "
                                  f"[0, {vocab_size})")


def check_structured_outputs(engine, sampling) -> None:
    """A job-wide sampling.structured_outputs the engine cannot run (xgrammar missing, a
    schema / regex / grammar that does not compile) refuses the job (InvalidJobError): every
    row without its own spec would be an error row. Engines without the check (a custom
    factory's, the fake engine) are not judged; a per_row column stays per row."""
    spec = sampling.structured_outputs
    why = getattr(engine, "structured_outputs_error", None)
    if spec is None or "structured_outputs" in sampling.per_row or not callable(why):
        return
    error = why(spec)
    if error is not None:
        raise InvalidJobError(f"sampling.structured_outputs: {error}")


def kv_pool_tokens(engine) -> Optional[int]:
    """Tokens the engine's KV pool holds (runner.num_kv_blocks blocks of config.block_size, as
    the engine's own request check reads them; a tensor-parallel runner reports the smallest
    rank's pool), or None for an engine that names no pool (a custom factory's, the fake
    engine without engine.kv_cache_blocks)."""
    num_blocks = getattr(getattr(engine, "runner", None), "num_kv_blocks", None)
    block_size = getattr(getattr(engine, "config", None), "block_size", None)
    if num_blocks is None or block_size is None:
        return None
    return int(num_blocks) * int(block_size)


def check_kv_pool(engine, max_model_len: int, kv_cache_blocks: Optional[int]) -> None:
    """Refuse the job (InvalidJobError, one line) when the KV pool cannot hold one sequence of
    max_model_len tokens, as vLLM refuses to start; `kv_cache_blocks` is the job's setting
    (None: the pool was sized from memory), which decides the fix the line names.

    The rule is pool >= max_model_len, not the smaller pool >= min(max_model_len, the longest
    row): prompt lengths are known only row by row (and max_new_tokens may be per row), and a
    row is run until it reaches max_model_len, so any smaller pool lets some row fail for the
    pool alone. Such an error row is committed, and the pool size is a performance knob left
    out of the config hash, so a resume with a larger pool skips it: the row is lost. A user
    who wants a small pool lowers engine.max_model_len, which is hashed, and rows that do not
    fit it are then error rows for their own length. A draft model's pool has as many blocks
    as the target's (draft_proposer.py), so this covers it too."""
    pool = kv_pool_tokens(engine)
    if pool is None or pool >= max_model_len:
        return
    block_size = engine.config.block_size
    num_blocks = pool // block_size
    need = -(-max_model_len // block_size)
    if kv_cache_blocks is not None:
        fix = (f"raise engine.kv_cache_blocks to {need} or more (or set it to null to size the "
               f"pool from engine.gpu_memory_utilization)")
    else:
        fix = (f"raise engine.gpu_memory_utilization (or set engine.kv_cache_blocks to {need} "
               f"or more)")
    raise InvalidJobError(f"KV cache too small: the pool holds {pool} tokens ({num_blocks} "
                          f"blocks of {block_size}), fewer than one sequence of max_model_len "
                          f"{max_model_len} tokens, so longer rows could never run; {fix}, or "
                          f"lower engine.max_model_len to {pool} or less")


def kept_prompt_tokens(sampling, max_model_len: int) -> Optional[int]:
    """How many trailing prompt tokens a row keeps (sampling.truncate_prompt_tokens, -1 read
    as max_model_len - 1, the longest prompt that runs), or None: prompts are not cut."""
    keep = sampling.truncate_prompt_tokens
    return max_model_len - 1 if keep == -1 else keep


def prompt_length_error(num_prompt_tokens: int, max_model_len: int) -> Optional[str]:
    """A prompt runs when it leaves room for one output token; generation then stops at
    max_model_len with finish_reason "length" (stop_rules.py), whatever max_new_tokens is.
    (It used to need prompt + max_new_tokens <= max_model_len, so the context-limit stop
    never triggered from a job and a long prompt was an error row vLLM would have run.)"""
    if num_prompt_tokens >= max_model_len:
        return (f"prompt has {num_prompt_tokens} tokens, at least max_model_len "
                f"({max_model_len}): no room for an output token")
    return None


def row_error(num_prompt_tokens: int, params, max_model_len: int,
              vocab_size: Optional[int]) -> Optional[str]:
    """Why one row (its prompt and its sampling, per-row overrides included) cannot run, or
    None. logprobs beyond the vocabulary is the engine's own row check."""
    for key in ("stop_token_ids", "allowed_token_ids"):
        bad = _out_of_vocab(getattr(params, key) or (), vocab_size)
        if bad is not None:
            return f"{key}: {bad} is outside the vocabulary [0, {vocab_size})"
    return prompt_length_error(num_prompt_tokens, max_model_len)
