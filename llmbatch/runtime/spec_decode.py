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
    (n from max_n down to min_n) and propose the tokens that followed it.

    Each request keeps an index (req.proposer_state) of the latest start of every n-gram that
    has a token after it, extended by the tokens appended since the last call: a proposal costs
    O(new tokens * n-gram sizes) instead of a backward scan of the whole context per size
    (~280 us a step at a 4k context of unrelated tokens, measured on the CPU here)."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, req: Request, num_tokens: int) -> list[int]:
        tokens = req.all_token_ids
        length = len(tokens)
        if num_tokens <= 0:
            return []
        index = req.proposer_state
        if not isinstance(index, _NgramIndex) or not index.extends(self, tokens):
            index = req.proposer_state = _NgramIndex(self.min_n, self.max_n)
        index.update(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = index.latest[n].get(tuple(tokens[length - n:]))
            if start is not None:   # indexed starts all have a token after the n-gram
                return tokens[start + n:start + n + num_tokens]
        return []


class _NgramIndex:
    """latest[n][gram] = the largest start s with tokens[s:s+n] == gram and s + n < len(tokens)
    when last updated (a match ends before the last token, so the suffix never matches
    itself and a follow-up token exists)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.latest: dict[int, dict[tuple, int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.length = 0          # len(tokens) at the last update
        self.head: list[int] = []  # the first tokens seen, to notice a different token list

    def extends(self, proposer: NgramProposer, tokens: list[int]) -> bool:
        """Whether `tokens` only grew since the last update (tokens are appended, never
        rewritten; a shorter or different list, or other n-gram sizes, rebuild the index)."""
        return ((self.min_n, self.max_n) == (proposer.min_n, proposer.max_n)
                and len(tokens) >= self.length and tokens[:len(self.head)] == self.head)

    def update(self, tokens: list[int]) -> None:
        length = len(tokens)
        for n, latest in self.latest.items():
            # Starts newly followed by a token: max(0, old - n) .. length - n - 1, ascending,
            # so a later start overwrites an earlier one.
            for s in range(max(0, self.length - n), length - n):
                latest[tuple(tokens[s:s + n])] = s
        self.length = length
        if not self.head:
            self.head = tokens[:8]


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
