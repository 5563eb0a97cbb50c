"""W-SPEC's replay proposer (BENCH.md): proposes a request's TRUE greedy continuation (recorded
from a run with speculation off), each proposed token corrupted with probability 1 - alpha.

Random weights copy nothing, so a real proposer would never be accepted; replaying the known
continuation with controlled corruption makes the acceptance rate a parameter. With k proposals
the expected tokens per target step is (1 - alpha^(k+1)) / (1 - alpha): a proposal counts only if
every earlier one was accepted, plus the bonus/recovered token.

Corruption is a pure function of (seed, request id, output position), never of batch
composition or step timing, so spec-on runs are reproducible. No torch.

Engine hook (not in the runtime yet): the harness calls `engine.set_proposer(proposer)` when the
engine has it, and the engine asks `proposer.propose(request, k)` for up to k draft tokens
after `request.output_token_ids`.
"""

from __future__ import annotations

import random
import zlib
from typing import Any, Sequence


class ReplayProposer:
    def __init__(self, continuations: dict[Any, Sequence[int]], alpha: float, vocab_size: int,
                 min_token_id: int = 100, seed: int = 0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if vocab_size <= min_token_id + 1:
            raise ValueError(f"vocab_size must be > {min_token_id + 1}, got {vocab_size}")
        self.continuations = {rid: list(toks) for rid, toks in continuations.items()}
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.min_token_id = min_token_id
        self.seed = seed
        # Every proposal, drawn here (untimed): token_at costs ~4 us a token (a seeded Random),
        # which inside propose made W-SPEC's batch-1 steps ~25-50 us slower on the host.
        self.proposals = {rid: [self.token_at(rid, p) for p in range(len(toks))]
                          for rid, toks in self.continuations.items()}

    def token_at(self, request_id: Any, position: int) -> int:
        """The proposal for output index `position`: the true token, or (prob. 1 - alpha) a
        different token from [min_token_id, vocab_size)."""
        true = self.continuations[request_id][position]
        key = f"{self.seed}:{request_id}:{position}".encode()
        rng = random.Random(zlib.crc32(key))
        if rng.random() < self.alpha:
            return true
        wrong = rng.randrange(self.min_token_id, self.vocab_size - 1)
        return wrong if wrong < true else wrong + 1       # uniform over tokens != true

    def propose(self, request, k: int) -> list[int]:
        """Up to k drafts after the request's current output (fewer near the recorded end)."""
        proposals = self.proposals.get(request.request_id)
        if proposals is None:
            return []
        start = len(request.output_token_ids)
        return proposals[start:start + k]
