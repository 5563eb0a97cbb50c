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
