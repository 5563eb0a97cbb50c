"""Speculative decoding: proposers and the acceptance rule (no torch).

Verification is lossless by construction. The sampler draws each output token from noise keyed
by (request seed, output index) only, so the token the target model would emit at output index
i is a fixed function of the context before it. A draft token is accepted iff it equals the
token the target samples at that index given the (already accepted) drafts before it; the first
mismatch is replaced by the target's own token ("recovered"), and when every draft is accepted
the target's next token comes free ("bonus"). The output is therefore token-for-token the output
with speculation off, greedy or sampled — the same guarantee as rejection sampling with a
deterministic (one-hot) proposal, whose acceptance probability p(draft) this rule also has.
"""

from __future__ import annotations

from typing import Protocol

from llmbatch.runtime.request import Request


class Proposer(Protocol):
    def propose(self, req: Request, num_tokens: int) -> list[int]:
        """Up to `num_tokens` draft tokens continuing req.all_token_ids (may be fewer or none)."""


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from max_n down to min_n) and propose the tokens that followed it."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, req: Request, num_tokens: int) -> list[int]:
        tokens = req.all_token_ids
        length = len(tokens)
        if num_tokens <= 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            first = suffix[0]
            # Scan backwards so the most recent match wins; a match must end before the suffix.
            for start in range(length - n - 1, -1, -1):
                if tokens[start] == first and tokens[start:start + n] == suffix:
                    follow = tokens[start + n:start + n + num_tokens]
                    if follow:
                        return follow
                    break
        return []


def num_accepted(draft: list[int], sampled: list[int]) -> int:
    """Leading drafts equal to the target's tokens at the same output index.

    `sampled` has len(draft) + 1 tokens: the target's token after the last known token and
    after each draft. The request keeps sampled[:num_accepted + 1].
    """
    accepted = 0
    for d, t in zip(draft, sampled):
        if d != t:
            break
        accepted += 1
    return accepted
