"""Scheduling of speculative draft tokens, mixed into Scheduler (no torch).

Drafts (req.spec_token_ids, set by a proposer before schedule()) are optional work: a decode
computes 1 + k tokens to verify k of them, and they are the first thing given up.
  * While a request is still prefilling (more than one token left) its drafts are dropped.
  * They are cut to the step's remaining token budget (1 + k <= budget) and to the context
    limit (last position computed = num_tokens - 1 + k <= max_model_len - 1).
  * When the running requests' drafts would need more blocks than are free, every draft is
    dropped before any block is allocated, so an early request's drafts never take the block
    a later request needs for its one required token; schedule() also drops a request's
    drafts before it preempts anyone for them.
How a verification step's result advances a request is in scheduler.py (update_from_output).
"""

from __future__ import annotations

from llmbatch.runtime.request import Request


class DraftsMixin:
    """Needs the Scheduler's block_manager, block_size, running and max_model_len."""

    def drop_all_drafts(self) -> None:
        """Every running request's drafts, gone: the pool is short (below), the proposer was
        removed, or (async engines) a synchronous step left drafts that no async step may see."""
        for req in self.running:
            req.spec_token_ids = []

    def _drop_drafts_if_pool_short(self) -> None:
        """Drafts are optional: when the running requests' drafts would need more blocks than
        are free, drop every draft up front, so an earlier request's drafts never take the
        blocks a later request needs for its one required token (which would preempt it)."""
        bs = self.block_size
        needed = 0
        has_drafts = False
        for req in self.running:
            has_drafts = has_drafts or bool(req.spec_token_ids)
            num_tokens = req.num_tokens + len(req.spec_token_ids)
            needed += max(0, -(-num_tokens // bs) - len(req.block_table))
        if has_drafts and needed > self.block_manager.num_free_blocks:
            self.drop_all_drafts()

    def _fit_drafts(self, req: Request, remaining: int, budget: int) -> None:
        """Cut a running request's drafts to what this step can verify (it has some):
        `remaining` known and pending tokens still to compute, `budget` tokens left."""
        if remaining > 1:
            req.spec_token_ids = []   # still prefilling: drafts make no sense yet
        else:
            # Drafts need budget and positions below the context limit:
            # last position computed = num_tokens - 1 + k <= max_model_len - 1.
            max_k = budget - 1
            if self.max_model_len is not None:
                max_k = min(max_k, self.max_model_len - req.num_tokens)
            if len(req.spec_token_ids) > max_k:
                req.spec_token_ids = req.spec_token_ids[:max(0, max_k)]
