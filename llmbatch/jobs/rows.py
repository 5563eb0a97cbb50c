"""Assembly of output rows: the fixed result columns from a GenerationResult or a row error.

A row dict starts as the kept input columns plus `id` (built when the row is read) and is
completed here; `io/writer.py` turns a list of them into a part with the contract's schema.
"""

from __future__ import annotations

from typing import Optional, Sequence


def logprobs_to_rows(logprobs: Optional[list[dict]]) -> Optional[list[dict]]:
    """Engine logprobs -> the `logprobs` column's values (list of structs).

    Engine format per output token: {"token_id", "logprob", "top": [(token_id, logprob), ...]}.
    """
    if logprobs is None:
        return None
    return [{"token_id": int(entry["token_id"]), "logprob": float(entry["logprob"]),
             "top": [{"token_id": int(t), "logprob": float(lp)}
                     for t, lp in (entry.get("top") or [])]}
            for entry in logprobs]


def prompt_logprobs_to_rows(entries: Optional[list]) -> Optional[list[Optional[dict]]]:
    """Engine prompt_logprobs (None, then one logprobs entry per prompt token) -> the
    `prompt_logprobs` column's values: the first element stays null."""
    if entries is None:
        return None
    return [None] + logprobs_to_rows(entries[1:])


def fill_from_result(row: dict, result, extra_output: Sequence[str] = ()) -> dict:
    """extra_output: the job's optional columns (JobSpec.extra_output_columns); the logprobs
    ones among them are filled from the result."""
    # An error result (the engine refused the request) has no output, as a row refused before
    # the engine (fill_error): null text and ids (they were "" and [] until output rules v4).
    failed = result.finish_reason == "error"
    row.update(output_text=None if failed else result.output_text,
               output_token_ids=None if failed else list(result.output_token_ids),
               finish_reason=result.finish_reason, error=result.error,
               num_prompt_tokens=result.num_prompt_tokens,
               num_cached_prompt_tokens=result.num_cached_prompt_tokens,
               num_output_tokens=result.num_output_tokens, ttft_s=result.ttft_s,
               tpot_s=result.tpot_s, latency_s=result.latency_s,
               spec_accepted_tokens=result.spec_accepted_tokens)
    if "logprobs" in extra_output:
        row["logprobs"] = logprobs_to_rows(getattr(result, "logprobs", None))
    if "prompt_logprobs" in extra_output:
        row["prompt_logprobs"] = prompt_logprobs_to_rows(getattr(result, "prompt_logprobs",
                                                                 None))
    return row


def fill_error(row: dict, error: str, token_ids: Optional[list[int]]) -> dict:
    """A row that never reached the engine: finish_reason "error", no output."""
    row.update(output_text=None, output_token_ids=None, finish_reason="error", error=error,
               num_prompt_tokens=len(token_ids) if token_ids else 0, num_cached_prompt_tokens=0,
               num_output_tokens=0, ttft_s=None, tpot_s=None, latency_s=None,
               spec_accepted_tokens=0)
    return row
