"""Rows and sampling values checked against the loaded engine's limits: its context length and
its vocabulary, known only once the model is loaded (no torch).

The job's own values apply to every row (a row without a per-row override takes them), so one
that no row could run with is a job error (InvalidJobError, exit 2, before any row runs and
nothing written), not one error row per prompt. Per-row overrides stay row errors.
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
    if vocab_size is None:
        return
    if ("logprobs" not in per_row and sampling.logprobs is not None
            and sampling.logprobs > vocab_size):
        raise InvalidJobError(f"sampling.logprobs={sampling.logprobs} exceeds the vocabulary "
                              f"size {vocab_size}")
    bad = _out_of_vocab(sampling.stop_token_ids, vocab_size)
    if bad is not None:
        raise InvalidJobError(f"sampling.stop_token_ids: {bad} is outside the vocabulary "
                              f"[0, {vocab_size})")


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
    bad = _out_of_vocab(params.stop_token_ids, vocab_size)
    if bad is not None:
        return f"stop_token_ids: {bad} is outside the vocabulary [0, {vocab_size})"
    return prompt_length_error(num_prompt_tokens, max_model_len)
