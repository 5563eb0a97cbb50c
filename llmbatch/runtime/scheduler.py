"""Continuous batching over one token budget (no torch). See docs/runtime.md.

Each step the scheduler hands every scheduled request a number of new tokens to compute,
starting at its num_computed_tokens. Prefill, chunked prefill, prefix-cache hits, decode and
speculative verification are all that one mechanism.

Policy, in order, under `max_num_batched_tokens` tokens and `max_num_seqs` running requests:
  1. Running requests, in admission order: a decode gets 1 + len(spec_token_ids) tokens, an
     unfinished prefill gets the rest of its tokens, both cut to the remaining budget. When
     the pool has no block for one, its draft tokens are dropped first, then the most
     recently admitted running request is preempted by recompute (possibly the request
     itself), until it fits.
  2. If nothing was preempted this step (the pool is tight otherwise), waiting requests in
     queue order: a prefix-cache hit starts them at num_computed_tokens > 0, a follower waits
     for its prefix leader, the first that does not fit stops admission.

Where the rest lives (mixins of Scheduler, using its state): admission of waiting requests
in scheduler_admission.py; the draft-token rules (drop, trim, drop all when the pool is short)
in scheduler_drafts.py; async scheduling's pending tokens (commit_launched, apply_sampled,
fits_without_preemption) in scheduler_async.py. ScheduledRequest / SchedulerOutput, the step
handed to the runner, are in scheduler_output.py (re-exported here).

Speculative accounting (update_from_output): a verification step computes the last known
token plus k draft tokens (num_new_tokens = 1 + k) and the runner returns m tokens,
1 <= m <= k + 1: the m - 1 accepted drafts followed by one bonus/recovered token. The K/V
written for the last known token and the accepted drafts is valid, that of the k - (m - 1)
rejected drafts is not, so num_computed_tokens advances by num_new_tokens - (k - (m - 1)) = m
and the request is back in decode state (num_computed_tokens == num_tokens - 1).
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from operator import attrgetter
from typing import Any, Optional

from llmbatch.runtime.block_manager import BlockManager
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.request import FinishReason, Request, RequestStatus
from llmbatch.runtime.scheduler_admission import AdmissionMixin
from llmbatch.runtime.scheduler_async import AsyncSchedulingMixin
from llmbatch.runtime.scheduler_drafts import DraftsMixin
from llmbatch.runtime.scheduler_output import ScheduledRequest, SchedulerOutput

# The step records moved to scheduler_output.py; this path keeps importing them.
__all__ = ["Scheduler", "ScheduledRequest", "SchedulerOutput"]


_spec_token_ids = attrgetter("spec_token_ids")


class Scheduler(AdmissionMixin, DraftsMixin, AsyncSchedulingMixin):
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 max_model_len: Optional[int] = None) -> None:
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        # The engine passes the resolved context limit; None means "no limit".
        self.max_model_len = max_model_len if max_model_len is not None else config.max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order: last = most recent
        # Unfinished requests added here, by id: leader gating only waits on these.
        self._unfinished: dict[Any, Request] = {}
        # leader -> the follower that recomputes the group's prefix because the leader
        # finished and the prefix was (partly) evicted before the rest of its group came in:
        # the siblings then wait for this stand-in instead of all recomputing the prefix.
        # Weak keys: an entry lives as long as someone still refers to the leader.
        self._stand_ins: "weakref.WeakKeyDictionary[Request, Request]" = (
            weakref.WeakKeyDictionary())
        self.num_preemptions = 0                  # total over the run
        self.num_steps = 0

    # -- queue sizes -----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- requests in and out ---------------------------------------------------------------
    def check_request(self, req: Request) -> Optional[str]:
        """Why the request can never run here (one line), or None when it can."""
        if self.max_model_len is not None and req.num_tokens > self.max_model_len:
            return (f"request {req.request_id!r} has {req.num_tokens} tokens; the context "
                    f"limit (max_model_len) is {self.max_model_len}")
        num_blocks = -(-req.num_tokens // self.block_size)
        if num_blocks > self.block_manager.num_blocks:
            return (f"request {req.request_id!r} needs {num_blocks} KV blocks for its "
                    f"{req.num_tokens} tokens; the pool has {self.block_manager.num_blocks}")
        return None

    def add_request(self, req: Request) -> None:
        """Append to the waiting queue. Raises ValueError for a request that can never run."""
        if req.status != RequestStatus.WAITING or req.block_table:
            raise ValueError(f"request {req.request_id!r} is {req.status.value}; only new "
                             f"requests can be added")
        error = self.check_request(req)
        if error is not None:
            raise ValueError(error)
        self.waiting.append(req)
        self._unfinished[req.request_id] = req

    def finish_request(self, req: Request, reason: FinishReason) -> None:
        """Mark finished, release its blocks, drop it from the queues."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)   # O(max_num_seqs)
        else:
            try:
                self.waiting.remove(req)   # rare (abort of a waiting request)
            except ValueError:
                pass
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.spec_token_ids = []
        if self._unfinished.get(req.request_id) is req:
            del self._unfinished[req.request_id]

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        running, scheduled = self.running, out.scheduled
        if any(map(_spec_token_ids, running)):   # C-level scan: drafts are rare at large batch
            self._drop_drafts_if_pool_short()
        bs, max_len = self.block_size, self.max_model_len
        # 1. Running requests. Victims are popped from the end, so index i never skips one.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            pending = req.num_pending_tokens
            if pending and self._pending_token_finishes(req):
                i += 1   # async: its in-flight token is its last; the engine finishes it
                continue
            computed = req.num_computed_tokens
            # Decode fast path (most requests, every step): one token to compute, no drafts,
            # its slot inside a block the request holds, below the context limit. What
            # _num_new_tokens_running and allocate_slots would decide, without the calls.
            if (len(req.all_token_ids) + pending - computed == 1 and not req.spec_token_ids
                    and computed < len(req.block_table) * bs
                    and (max_len is None or computed < max_len)):
                scheduled.append(ScheduledRequest(req, 1))
                budget -= 1
                i += 1
                continue
            num_new = self._num_new_tokens_running(req, budget)
            while bm.allocate_slots(req, num_new) is None:
                if req.spec_token_ids:
                    # Drafts are optional: drop them before preempting anyone.
                    num_new -= len(req.spec_token_ids)
                    req.spec_token_ids = []
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1

        # 2. Waiting requests, unless the pool was too tight for the running ones.
        if not out.preempted:
            budget = self._admit_waiting(out, budget)

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        self.num_steps += 1
        return out

    def _num_new_tokens_running(self, req: Request, budget: int) -> int:
        """Tokens for a running request this step; trims its draft tokens to what fits."""
        remaining = req.num_tokens + req.num_pending_tokens - req.num_computed_tokens
        if remaining < 1:
            raise RuntimeError(f"request {req.request_id!r} is running with nothing to compute "
                               f"(was its sampled token lost?)")
        if req.spec_token_ids:
            self._fit_drafts(req, remaining, budget)
        num_new = min(remaining + len(req.spec_token_ids), budget)
        if self.max_model_len is not None and req.num_computed_tokens + num_new > self.max_model_len:
            raise RuntimeError(
                f"request {req.request_id!r} reached {req.num_tokens} tokens, past the context "
                f"limit {self.max_model_len}; it should have been finished")
        return num_new

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: free the blocks (their hashes stay cached), restart at 0,
        go to the FRONT of the waiting queue. Output tokens stay and get recomputed."""
        if req.num_pending_tokens:
            # Its recompute would sample the in-flight token a second time. The engine only
            # schedules over a step in flight when fits_without_preemption() said so.
            raise RuntimeError(f"request {req.request_id!r} preempted with a token in flight")
        self.block_manager.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[Any, list[int]]) -> None:
        """Advance counters, append sampled tokens, register newly full blocks."""
        now = time.perf_counter()
        cache_full_blocks = self.block_manager.cache_full_blocks
        running = RequestStatus.RUNNING
        for item in out.scheduled:
            req = item.request
            if req.status is not running:
                continue   # finished (aborted) since schedule()
            tokens = sampled.get(req.request_id) or []
            if len(tokens) == 1 and not req.spec_token_ids:
                # Fast path (a decode or a prefill's last chunk, no drafts): the one sampled
                # token is valid exactly when this step reached the end of the known tokens.
                computed = req.num_computed_tokens + item.num_new_tokens
                if computed >= len(req.all_token_ids):
                    req.num_computed_tokens = computed
                    req.append_output_token(tokens[0], now)
                    cache_full_blocks(req)
                    continue
            num_spec = len(req.spec_token_ids)
            # == item.samples, inlined: this loop runs for every request every step.
            if req.num_computed_tokens + item.num_new_tokens >= len(req.all_token_ids):
                if not 1 <= len(tokens) <= num_spec + 1:
                    raise RuntimeError(
                        f"request {req.request_id!r}: expected 1..{num_spec + 1} sampled tokens, "
                        f"got {len(tokens)}")
                num_rejected = num_spec - (len(tokens) - 1)
                req.num_spec_accepted_tokens += len(tokens) - 1
            else:
                if tokens:
                    raise RuntimeError(f"request {req.request_id!r}: partial prefill chunk "
                                       f"cannot sample, got {len(tokens)} tokens")
                num_rejected = 0
            req.num_computed_tokens += item.num_new_tokens - num_rejected
            for token in tokens:
                req.append_output_token(token, now)
            if num_spec:
                req.spec_token_ids = []
            # After appending: accepted drafts are real tokens now and may complete a block.
            cache_full_blocks(req)
