"""The engine's side of speculative decoding: which proposer it builds, installing another one
(the bench's replay), and giving running requests their draft tokens before each step.
The acceptance rule and the n-gram proposer are in spec_decode.py, the draft model in
draft_proposer.py.
"""

from __future__ import annotations

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.spec_decode import NgramProposer


def make_proposer(config: EngineConfig, runner, max_model_len: int):
    """The proposer of config.speculative_method, or None. A draft model sizes its KV pool
    from the target's (runner.num_kv_blocks), so it is built after the runner."""
    if config.speculative_method == "ngram":
        return NgramProposer()
    if config.speculative_method == "draft":
        from llmbatch.runtime.draft_proposer import DraftModelProposer

        return DraftModelProposer(config, runner.num_kv_blocks, max_model_len,
                                  runner.hf_config.vocab_size)
    return None


class SpeculationMixin:
    """Mixed into Engine: uses its config, scheduler, max_model_len and async_scheduling.

    Speculative steps are synchronous: the proposer drafts from every token so far and the
    verify step's accepted count decides the next positions. An async engine (the CUDA default)
    runs them where they pay, at most speculative_max_num_seqs requests in the batch, and
    async steps without drafts above that (W-SPEC at batch 64: speculation used to force every
    step synchronous there, 0.75-0.79x the async engine on an H200, bench/RESULTS.md stop 13).
    """

    def set_proposer(self, proposer) -> None:
        """Install any object with propose(request, num_tokens) -> list[int] (bench replay), or
        None to stop drafting. Safe between any two steps: drafts are handed out only right
        before a synchronous step, after the step in flight (if any) was collected."""
        if proposer is None:
            # Drafts handed out for a step that did not schedule their request would be
            # verified later without a proposer, or reach an async step, which refuses drafts.
            self.scheduler.drop_all_drafts()
        self.proposer = proposer

    def _speculates_next_step(self) -> bool:
        """Whether the next step hands out drafts (async engines: and so runs synchronously).
        The batch it will run: the running requests and the waiting ones it may admit, at most
        max_num_seqs. Above speculative_max_num_seqs, _propose drafts nothing."""
        if self.proposer is None:
            return False
        scheduler = self.scheduler
        batch = min(len(scheduler.running) + scheduler.num_waiting, self.config.max_num_seqs)
        return batch <= self.config.speculative_max_num_seqs

    def _propose(self) -> None:
        """Give decoding requests draft tokens, unless the batch is too large to gain.

        Verification multiplies a request's step cost by about (1 + k) in compute; at small
        batches a step is bound by reading the weights, so that is nearly free, but at large
        batches it is not: above speculative_max_num_seqs running requests, no drafts.
        """
        running = self.scheduler.running
        if not running or len(running) > self.config.speculative_max_num_seqs:
            return
        k = self.config.num_speculative_tokens
        drafting = []   # decoding requests that may draft (graph padding below)
        for req in running:
            req.spec_token_ids = []   # last step's drafts were verified or dropped
            if req.num_computed_tokens != req.num_tokens - 1:
                continue   # still prefilling
            params = req.sampling_params
            if params.needs_history:
                continue   # a verify row would need the drafts before it in its history
            # Never draft past max_new_tokens or the context: all k + 1 tokens must fit.
            room = min(k, params.max_new_tokens - req.num_output_tokens - 1,
                       self.max_model_len - req.num_tokens - 1)
            drafting.append(req)
            if room <= 0:
                continue
            if hasattr(self.proposer, "reserve"):
                # Two-phase proposer (draft model): placeholders now, filled after scheduling.
                req.spec_token_ids = self.proposer.reserve(req, room)
            else:
                req.spec_token_ids = list(self.proposer.propose(req, room))[:room]
        if (drafting and not hasattr(self.proposer, "reserve")
                and self._verify_graph_drafts() == k
                and any(req.spec_token_ids for req in drafting)):
            self._pad_drafts(drafting, k)

    def _verify_graph_drafts(self) -> int:
        """k when the runner replays CUDA graphs of verify steps of k + 1 tokens a sequence
        (cuda_graphs.DecodeGraphRunner.verify_tokens), else 0."""
        graphs = getattr(self.runner, "graph_runner", None)
        tokens = getattr(graphs, "verify_tokens", 0) if graphs is not None else 0
        return tokens - 1 if tokens > 1 else 0

    def _pad_drafts(self, drafting: list, k: int) -> None:
        """Top every drafting request's drafts up to exactly k, so the step's spans are all
        k + 1 tokens and it replays a verify graph: a step with fewer drafts for any request
        runs eagerly, ~16 ms at batch 1 on an H200 against ~1.4 ms replayed (W-SPEC stop 19:
        the proposals cut by max_new_tokens near a request's end; a real proposer's short or
        empty proposals, every step). The filler repeats the last token: verification stays
        lossless (a draft counts only where it equals the target's own token), and tokens
        past max_new_tokens are trimmed by the stop rules (stop_rules.apply_stop_rules). Only
        the context limit is kept: a request without room for k stays as it is (eager)."""
        for req in drafting:
            drafts = req.spec_token_ids
            if len(drafts) >= k or self.max_model_len - req.num_tokens - 1 < k:
                continue
            filler = drafts[-1] if drafts else req.all_token_ids[-1]
            req.spec_token_ids = drafts + [filler] * (k - len(drafts))
