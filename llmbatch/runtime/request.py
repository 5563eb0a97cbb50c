"""Request state for the engine: counters, not phases (no torch).

A request is a token sequence `prompt_token_ids + output_token_ids` of which the first
`num_computed_tokens` have their K/V in the paged cache. Each step the scheduler grants it a
number of new tokens to compute; prefill, chunked prefill, a prefix-cache hit (admission with
`num_computed_tokens > 0`), decode (1 token) and speculative verification (1 + k tokens) are
all the same mechanism.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Optional

from llmbatch.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted and waiting to recompute
    RUNNING = "running"      # holds KV blocks, scheduled each step
    FINISHED = "finished"    # blocks released; result emitted


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_new_tokens or the model's context limit
    ERROR = "error"          # rejected (e.g. prompt too long); never ran


class Request:
    """One generation request and its progress through the engine."""

    def __init__(
        self,
        request_id: Any,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: Optional[float] = None,
    ) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: empty prompt")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []
        # prompt + output, kept as one list so the hot path never concatenates.
        self.all_token_ids: list[int] = list(prompt_token_ids)

        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at first admission (reported per row).
        self.num_cached_tokens: Optional[int] = None
        # Physical KV block ids, in logical order. Owned by the BlockManager.
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of all_token_ids, computed lazily by BlockManager.
        self.block_hashes: list[int] = []

        # Speculative decoding: proposed (draft) tokens awaiting verification this step.
        # They are never part of all_token_ids and never enter the prefix cache.
        self.spec_token_ids: list[int] = []
        self.num_spec_accepted_tokens = 0
        # What a proposer keeps per request between steps (NgramProposer: its n-gram index).
        self.proposer_state = None
        # penalties.py: the distinct prompt ids, computed at the first penalized sample.
        self.penalty_prompt_ids: Optional[list[int]] = None

        # Async scheduling (docs/async_scheduling.md): tokens sampled by a step still in flight,
        # whose values the host does not know yet. They follow all_token_ids; the scheduler
        # counts them as known, and the next step reads the value on the device, at row
        # `pending_sample_index` of the in-flight step's sampled tokens. 0 when synchronous.
        self.num_pending_tokens = 0
        self.pending_sample_index: Optional[int] = None

        # Offline prefix ordering (planner): admit only after `prefix_leader` has computed
        # `prefix_leader_tokens` tokens, so a shared prefix is computed once.
        self.prefix_leader: Optional["Request"] = None
        self.prefix_leader_tokens = 0

        # Engine-owned state (set when the engine takes the request):
        # seed used when sampling_params.seed is None (from input order, batch-independent);
        self.default_seed: Optional[int] = None
        # stop-string detector (runtime/stop_checker.py) and how many output tokens the stop
        # rules have already seen;
        self.stop_checker: Optional[Any] = None
        self.num_stop_checked = 0
        # the stop rules folded for the per-step check (Engine._finish_stopped): the token ids
        # that stop it (EOS unless ignore_eos, and stop_token_ids), and the output length at
        # which it ends (max_new_tokens or the context limit, whichever comes first; 0 until
        # the engine admits the request, which keeps the fast check off);
        self.stop_token_set: frozenset = frozenset()
        # the ids min_tokens bans until then: stop_token_ids and EOS, with ignore_eos too (as
        # vLLM's min_tokens processor bans all stop ids);
        self.min_tokens_banned: frozenset = frozenset()
        self.max_output_tokens = 0
        # structured outputs: the request's xgrammar GrammarMatcher (Engine._admit) and how
        # many output tokens it has accepted (append_output_token feeds it each one);
        self.grammar: Optional[Any] = None
        self.num_grammar_tokens = 0
        # bad_words as token sequences (token_rules.bad_word_sequences, at admission);
        self.bad_words_ids: list[list[int]] = []
        # per output token, when logprobs were asked for;
        self.output_logprobs: Optional[list[dict]] = None
        # per prompt token, when prompt_logprobs were asked for: None for the first token (no
        # context), then one entry per scored token (runtime/prompt_logprobs.py);
        self.prompt_logprobs: Optional[list[Optional[dict]]] = (
            [None] if sampling_params.prompt_logprobs is not None else None)
        # draft-model proposer's record of valid draft K/V (runtime/draft_proposer.py).
        self.draft_state: Optional[Any] = None

        self.num_preemptions = 0
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason: Optional[Any] = None   # the stop token id or string that matched

        # Timestamps (time.perf_counter seconds).
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs were asked for and some prompt token is not scored yet: the
        scheduler then gives it no prefix-cache hit (a cached token has no logits)."""
        return self.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far (prompt + output), excluding speculative ones."""
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    # -- updates -----------------------------------------------------------------------
    def append_output_token(self, token_id: int, now: Optional[float] = None) -> None:
        now = time.perf_counter() if now is None else now
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            # The sampler's mask allowed it (such requests run synchronously, so no dropped
            # async token gets here; a grammar's EOS ends the request: stop_rules).
            self.grammar.accept_token(token_id)
            self.num_grammar_tokens += 1
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id!r}, status={self.status.value}, "
            f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
