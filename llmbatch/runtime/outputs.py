"""What the engine yields for each finished request (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class GenerationResult:
    """One finished request. Times are seconds; None where they do not apply."""

    request_id: Any
    output_token_ids: list[int]
    output_text: str
    finish_reason: str                       # "stop" | "length" | "error"
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_output_tokens: int
    ttft_s: Optional[float]                  # arrival -> first output token
    tpot_s: Optional[float]                  # mean time per output token after the first
    latency_s: Optional[float]               # arrival -> finish
    spec_accepted_tokens: int = 0
    error: Optional[str] = None
    stop_reason: Optional[Any] = None
    # Per output token: {"token_id", "logprob", "top": [(token_id, logprob), ...]} when asked.
    logprobs: Optional[list[dict]] = None
    # Per prompt token when prompt_logprobs were asked for: None for the first, then the same
    # format as logprobs (runtime/prompt_logprobs.py).
    prompt_logprobs: Optional[list[Optional[dict]]] = None
    num_preemptions: int = 0
    extra: dict = field(default_factory=dict)


def result_of(req, output_text: str, error: Optional[str] = None) -> GenerationResult:
    """The result of a finished (or refused: `error`) Request, its text already detokenized
    (stop_rules.output_text)."""
    from llmbatch.runtime.request import FinishReason

    n_out = req.num_output_tokens
    # Timed from the step that first scheduled the request, not from add_request: the job
    # runner keeps a window of rows queued ahead of the engine, so time in that queue would
    # load the first window's rows (queued together at start) and spare the rest.
    started = req.first_scheduled_time
    ttft = tpot = latency = None
    if req.first_token_time is not None and started is not None:
        ttft = req.first_token_time - started
        if n_out > 1:
            tpot = (req.last_token_time - req.first_token_time) / (n_out - 1)
    if req.finish_time is not None and started is not None:
        latency = req.finish_time - started
    return GenerationResult(
        request_id=req.request_id,
        output_token_ids=list(req.output_token_ids),
        output_text=output_text,
        finish_reason=req.finish_reason.value if req.finish_reason else FinishReason.ERROR.value,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_prompt_tokens=req.num_cached_tokens or 0,
        num_output_tokens=n_out,
        ttft_s=ttft, tpot_s=tpot, latency_s=latency,
        spec_accepted_tokens=req.num_spec_accepted_tokens,
        error=error,
        stop_reason=req.stop_reason,
        logprobs=req.output_logprobs,
        # A request refused or failed has no scores (its list starts as [None], which would
        # read as a scored 1-token prompt).
        prompt_logprobs=req.prompt_logprobs if error is None else None,
        num_preemptions=req.num_preemptions,
    )
