"""Continuous batching over one token budget (no torch). Interface only; see docs/runtime.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmbatch.runtime.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int           # tokens to compute this step, from request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens >= req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0
