"""Sampling values checked alike in the job's sampling section and in per-row columns (no
torch): the section's validators raise for the job (exit 2); row_value's ValueError becomes that
row's error (the runner records it, the job goes on).
"""

from __future__ import annotations

import json
import math

from llmbatch.runtime.structured_outputs import check_spec


# Checks shared by the job's sampling section and per-row values (those become row errors).
def check_top_k(value: int) -> int:
    """-1 or 0 (off, as in vLLM; the sampler keeps every token for top_k <= 0) or a positive
    number of tokens. 0 comes back as -1, the default: one spelling of "off", so one config
    hash (hashed as written they were two, and a resume with the other spelling was refused)."""
    if value < -1:
        raise ValueError("must be -1 or 0 (off) or a positive number of tokens")
    return -1 if value == 0 else value


def check_stop(value: list[str]) -> list[str]:
    if any(s == "" for s in value):     # the stop checker would drop it: say so instead
        raise ValueError("an empty stop string stops nothing; remove it")
    return value


def check_stop_token_ids(value: list[int]) -> list[int]:
    negative = [t for t in value if t < 0]
    if negative:
        raise ValueError(f"token ids are >= 0, got {negative[0]}")
    return value


def check_allowed_token_ids(value: list[int]) -> list[int]:
    if not value:      # would allow no token at all (vLLM refuses it too); null means all
        raise ValueError("an empty list allows no token; use null to allow every token")
    return check_stop_token_ids(value)


# Per-row keys by the Python values row_value takes (jobs/column_types.py: their Arrow types).
# min_tokens <= max_new_tokens is SamplingParams' check (a row may override either).
INT_KEYS = ("max_new_tokens", "top_k", "seed", "logprobs", "min_tokens", "prompt_logprobs")
# Their ranges are SamplingParams' own: a value out of range is that row's error there.
FLOAT_KEYS = ("temperature", "top_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "min_p")
BOOL_KEYS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
TEXTS_KEYS = ("stop", "bad_words")                      # a text, or a list of texts
TOKEN_IDS_KEYS = ("stop_token_ids", "allowed_token_ids")  # a list of token ids


def row_value(key: str, value):
    """One per-row sampling cell, coerced to the type SamplingParams expects; a one-line
    ValueError for anything else (the runner turns it into a row error, never a crash).

    A column holds whatever the table's writer chose: pandas makes an int column with nulls
    float (3.0), and a single stop string is natural where the job file takes a list.
    """
    def bad(expected: str):
        return ValueError(f"{key} must be {expected}, got {value!r}")

    if key in INT_KEYS:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise bad("an integer")
            value = int(value)
        if not isinstance(value, int):
            raise bad("an integer")
        if key == "top_k":
            try:
                value = check_top_k(value)
            except ValueError as exc:      # the section's own rule, as a row error
                raise ValueError(f"{key} {exc}, got {value!r}") from None
        return value
    if key in FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in TEXTS_KEYS:
        items = [value] if isinstance(value, str) else value
        # A stop string may be whitespace ("\n"); a bad word may not (it would ban nothing).
        usable = (lambda v: v.strip()) if key == "bad_words" else (lambda v: v)
        if not isinstance(items, list) or not all(isinstance(v, str) and usable(v)
                                                  for v in items):
            raise bad("a non-empty string or a list of them")
        return items
    if key == "structured_outputs":
        # A cell is the JSON text of the mapping ('{"json": {...}}'), as a table stores it.
        spec = value
        if isinstance(value, str):
            try:
                spec = json.loads(value)
            except ValueError:
                raise bad("the JSON text of a structured_outputs mapping") from None
        check_spec(spec)        # its ValueError is the row's error
        return spec
    if key in TOKEN_IDS_KEYS:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad("a list of integers >= 0")
        if key == "allowed_token_ids" and not value:
            raise bad("a non-empty list of integers >= 0 (null: every token)")
        return value
    return value
