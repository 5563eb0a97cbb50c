"""The scheduler's side of async scheduling (docs/async_scheduling.md), mixed into Scheduler.

Step n+1 is planned while step n runs: commit_launched advances a launched step at once and
gives each sampling request a pending token; apply_sampled later replaces the placeholders
with the real tokens. The rest of the scheduler counts pending tokens as known (see
Scheduler._num_new_tokens_running and ScheduledRequest.samples).
"""

from __future__ import annotations

import time
from typing import Any

from llmbatch.runtime.request import Request, RequestStatus
from llmbatch.runtime.scheduler_output import SchedulerOutput


class AsyncSchedulingMixin:
    """Needs the Scheduler's block_manager, block_size, running, max_model_len and
    max_num_batched_tokens."""

    def _pending_token_finishes(self, req: Request) -> bool:
        """True when the request's in-flight token reaches max_new_tokens or the context limit
        (the engine's length rules), so it must not be scheduled again."""
        # len() rather than the num_* properties: called for every running request every step.
        pending = req.num_pending_tokens
        if len(req.output_token_ids) + pending >= req.sampling_params.max_new_tokens:
            return True
        return (self.max_model_len is not None
                and len(req.all_token_ids) + pending >= self.max_model_len)

    def fits_without_preemption(self) -> bool:
        """True when the pool can give every running request blocks for whatever schedule()
        may grant it this step: then schedule() preempts no one. Waiting requests never
        preempt (admission stops at the first that does not fit)."""
        running = self.running
        bs = self.block_size
        budget = self.max_num_batched_tokens
        free = self.block_manager.num_free_blocks
        # O(1) exit, taken by most async steps (the loop below cost ~5 % of the host time of a
        # 256-sequence step). Why schedule() cannot preempt when it holds: only its running
        # loop preempts, and only when allocate_slots fails. With N running requests, let n_i
        # be the tokens it grants request i (0 when skipped or out of budget; drafts and the
        # token at a pending position count like any other), and c_i its num_computed_tokens.
        #  (a) sum(n_i) <= B = max_num_batched_tokens: every grant is taken from the one step
        #      budget; dropping drafts after a failed allocation only lowers n_i before it is
        #      granted.
        #  (b) a running request's block table covers its computed tokens,
        #      len(block_table) >= ceil(c_i / bs): allocate_slots grows it to c + n before c
        #      moves up by at most n (commit, update_from_output), and preemption empties both.
        #      So allocate_slots(req, n_i) takes
        #        ceil((c_i + n_i) / bs) - len(block_table) <= ceil((c_i + n_i) / bs)
        #        - ceil(c_i / bs) <= ceil(n_i / bs)   blocks (none when n_i == 0).
        #  (c) ceil(n / bs) <= (n + bs - 1) / bs, so over the whole loop
        #        sum(ceil(n_i / bs)) <= (B + N * (bs - 1)) / bs < ceil(B / bs) + N.
        # Free blocks >= ceil(B / bs) + N therefore cover every allocation of the loop.
        # The loop's own bound lets each request use the whole budget B, so it can exceed this
        # one (several requests mid-prefill, or holding drafts): then this exit says True where
        # the loop would not, which (a)-(c) show is still safe. In the states the async engine
        # reaches (no drafts; at most one running request mid-prefill, since a prefill is left
        # partial only when the budget runs out on it) each other request's term in the loop
        # is at most 1 block and the partial one's at most ceil(B / bs), so the two agree.
        if free >= -(-budget // bs) + len(running):
            return True
        # The bound per request: all its known, pending and draft tokens, and no more than one
        # step's token budget (a long prompt in chunked prefill needs blocks for one chunk, not
        # for the rest of the prompt).
        needed = 0
        for req in running:
            total = min(len(req.all_token_ids) + req.num_pending_tokens + len(req.spec_token_ids),
                        req.num_computed_tokens + budget)
            more = -(-total // bs) - len(req.block_table)
            if more > 0:   # most requests: none (their next slot is in a block they hold)
                needed += more
        return needed <= free

    def commit_launched(self, out: SchedulerOutput) -> None:
        """Async: the step is on the device; advance every scheduled request as if it were
        done. A sampling request gets a pending token (value unknown until apply_sampled).
        Blocks full of KNOWN tokens are registered now: their K/V is written by work already
        queued on the stream, ahead of any later step that could read them.
        The pending token's row in the step's sampled tokens (pending_sample_index, read by the
        next step's deferred inputs) is its rank among the sampling requests: without drafts
        build_step_inputs gives each one sample row, in scheduled order."""
        cache_full_blocks = self.block_manager.cache_full_blocks
        sample_row = 0
        for item in out.scheduled:
            req = item.request
            if req.spec_token_ids:
                raise RuntimeError("async scheduling does not verify draft tokens")
            # == item.samples (taken before num_computed_tokens moves), inlined: this loop
            # runs for every request every step.
            pending = req.num_pending_tokens
            computed = req.num_computed_tokens + item.num_new_tokens
            req.num_computed_tokens = computed
            if computed >= len(req.all_token_ids) + pending:
                req.num_pending_tokens = pending + 1
                req.pending_sample_index = sample_row
                sample_row += 1
            cache_full_blocks(req)

    def apply_sampled(self, out: SchedulerOutput, sampled: dict[Any, list[int]]) -> int:
        """Async: the committed step's tokens reached the host; they replace the pending
        placeholders. A request finished meanwhile (its previous token was a stop) drops
        its token: it was computed past the stop. Returns how many tokens were dropped."""
        now = time.perf_counter()
        cache_full_blocks = self.block_manager.cache_full_blocks
        running = RequestStatus.RUNNING
        dropped = 0
        for item in out.scheduled:
            req = item.request
            tokens = sampled.get(req.request_id)
            if tokens is None:
                continue
            if req.status is not running:
                dropped += len(tokens)
                continue
            if len(tokens) != 1 or req.num_pending_tokens < 1:
                raise RuntimeError(f"request {req.request_id!r}: got {len(tokens)} sampled "
                                   f"tokens for {req.num_pending_tokens} pending")
            req.num_pending_tokens -= 1
            req.append_output_token(tokens[0], now)
            cache_full_blocks(req)
        return dropped
