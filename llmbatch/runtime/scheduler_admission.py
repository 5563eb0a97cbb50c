"""Admission of waiting requests, mixed into Scheduler (no torch): step 2 of the policy in
scheduler.py, with the planner's prefix-leader gating.

Waiting requests are admitted in queue order while the token budget, max_num_seqs and the pool
allow. A request whose prefix_leader has not yet computed prefix_leader_tokens is skipped for
this step only; the first request that does not fit in the pool stops admission (first come,
first served: later small requests must not starve it). If the leader finished before its
group got in and the prefix was evicted meanwhile, the first follower admitted recomputes it
as a stand-in and its siblings wait for the stand-in instead. Admission never preempts.
"""

from __future__ import annotations

import time

from llmbatch.runtime.request import Request, RequestStatus
from llmbatch.runtime.scheduler_output import ScheduledRequest, SchedulerOutput


class AdmissionMixin:
    """Needs the Scheduler's block_manager, waiting, running, max_num_seqs, _unfinished (the
    unfinished requests by id) and _stand_ins (leader -> the follower recomputing its prefix)."""

    def _active(self, req: Request) -> bool:
        """Unfinished and owned by this scheduler (so it will make progress)."""
        return not req.is_finished and self._unfinished.get(req.request_id) is req

    def _leader_pending(self, req: Request) -> bool:
        """True while the request's prefix leader still has to compute the shared prefix."""
        leader = req.prefix_leader
        if leader is None or req.prompt_logprobs_pending:   # it will not read the cache
            return False
        need = req.prefix_leader_tokens
        if not self._active(leader):
            # Finished (or never added): wait for the stand-in, if one is recomputing.
            leader = self._stand_ins.get(leader)
            if leader is None or leader is req or not self._active(leader):
                return False
            need = min(need, leader.prefix_leader_tokens)
        return leader.num_computed_tokens < need

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit from the head of the waiting queue into `out`; returns the budget left."""
        bm = self.block_manager
        skipped: list[Request] = []   # gated requests popped this step, put back in order
        now = time.perf_counter()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self._leader_pending(req):
                skipped.append(self.waiting.popleft())
                continue
            # A request still scoring its prompt computes it all: cached tokens have no logits.
            computed_blocks, num_cached = (([], 0) if req.prompt_logprobs_pending
                                           else bm.get_computed_blocks(req))
            num_new = min(req.num_tokens - num_cached, budget)
            if bm.allocate_slots(req, num_new, computed_blocks) is None:
                if not self.running and not out.scheduled:
                    # Nothing holds blocks, so the pool itself is too small for this request.
                    self.waiting.extendleft(reversed(skipped))
                    raise RuntimeError(
                        f"request {req.request_id!r} ({req.num_tokens} tokens) does not fit in "
                        f"the KV pool of {bm.num_blocks} blocks x {bm.block_size} tokens even "
                        f"alone; lower max_model_len or give the pool more memory")
                break
            self.waiting.popleft()
            leader = req.prefix_leader
            if (leader is not None and num_cached < req.prefix_leader_tokens
                    and not self._active(leader)):
                self._stand_ins[leader] = req
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens is None:      # first admission only: a per-row stat
                req.num_cached_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget
