"""What one scheduled step is (no torch): the scheduler's plan, handed to the model runner.

Scheduler.schedule() returns a SchedulerOutput; step_inputs.build_step_inputs flattens it for
the device, and Scheduler.update_from_output / commit_launched advance the requests by it.
Kept apart from scheduler.py so the runner side needs only these two small records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmbatch.runtime.request import Request


@dataclass(slots=True)   # slots: one is made per scheduled request per step
class ScheduledRequest:
    request: Request
    num_new_tokens: int           # tokens to compute this step, from request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        req = self.request
        return (req.num_computed_tokens + self.num_new_tokens
                >= req.num_tokens + req.num_pending_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)   # in batch order
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0
