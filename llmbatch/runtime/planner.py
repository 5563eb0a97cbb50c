"""Offline prefix grouping: DFS order over the prompt-token trie (no torch).

For an offline batch the order of admission decides the prefix-cache hit rate. Emitting the
requests of a window in depth-first order of their prompt trie puts requests that share a
prefix next to each other, and the deeper the shared prefix the closer they are (SGLang's
argument). Sorting the prompts lexicographically IS a DFS pre-order of that trie (children
visited in token order, a prompt before the prompts it is a prefix of), so a plain sort is
enough. It is cheap: the sort key packs the token ids into big-endian 4-byte words, so each
comparison is one memcmp instead of a Python loop over the shared prefix.

Ordering alone is not enough: requests of one group admitted in the same step would all
compute the shared prefix before any of it is cached. So each follower records a
`prefix_leader` (the earliest request of the window that holds its shared prefix) and
`prefix_leader_tokens`; the scheduler admits it only after the leader computed that many
tokens, and it then hits the leader's cached blocks.

Streaming: at most one window of requests is held at a time.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from itertools import islice
from typing import Iterable, Iterator

from llmbatch.runtime.config import ORDERINGS
from llmbatch.runtime.request import Request



def _bytes_key(req: Request) -> bytes:
    """Bytes whose order equals the lexicographic order of prompt_token_ids.

    Token ids become big-endian 4-byte words, so bytes order == numeric order, word by word,
    and a prompt that is a prefix of another sorts first. Raises OverflowError for an id
    outside [0, 2**32).
    """
    words = array("I", req.prompt_token_ids)
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def _list_key(req: Request) -> list[int]:
    return req.prompt_token_ids


class Planner:
    def __init__(self, ordering: str = "prefix", window: int = 4096, block_size: int = 16):
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering={ordering!r} is not one of {', '.join(ORDERINGS)}")
        if window < 1:
            raise ValueError(f"planner window must be >= 1, got {window}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.ordering = ordering
        self.window = window
        self.block_size = block_size

    def plan(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Yield the requests, reordered window by window when ordering == 'prefix'.

        ordering == 'input' streams them as given, leaders set among neighbours only: the
        follower of a request with the same leading blocks right before it (sampling.n's
        samples of one row, consecutive rows of one template) waits for it instead of
        computing the shared blocks in the same step."""
        if self.ordering == "input":
            chain = _LeaderChain(self.block_size)
            for i, req in enumerate(requests):
                if i % self.window == 0:
                    chain = _LeaderChain(self.block_size)   # bounds what the chain holds
                chain.add(req)
                yield req
            return
        it = iter(requests)
        while True:
            window = list(islice(it, self.window))
            if not window:
                return
            yield from self.order_window(window)

    def order_window(self, window: list[Request]) -> list[Request]:
        """Sort one window into trie DFS order and set leaders on the followers."""
        # Stable sort: identical prompts keep their input order (the first one leads).
        key = _bytes_key if array("I").itemsize == 4 else _list_key
        try:
            ordered = sorted(window, key=key)
        except OverflowError:   # an id outside [0, 2**32): compare the lists themselves
            ordered = sorted(window, key=_list_key)
        chain = _LeaderChain(self.block_size)
        for req in ordered:
            chain.add(req)
        return ordered


class _LeaderChain:
    """Sets prefix_leader / prefix_leader_tokens on each request added, in admission order.

    shared_i = full blocks common to request i-1 and request i. A follower's leader is the
    earliest j such that every neighbour pair between j and i shares at least the follower's
    block count, i.e. min(shared_{j+1..i}) >= s_i: then j holds those blocks too. In sorted
    (trie DFS) order the predecessor is also the request sharing the longest prefix, so this
    finds the best leader; in any other order it finds a correct one among neighbours. A
    monotonic stack of (shared, first index of the run) answers it with a binary search:
    O(n log n).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.added: list[Request] = []
        self.stack_shared: list[int] = []   # strictly increasing shared-block counts
        self.stack_start: list[int] = []    # earliest index reachable at that level

    def _shared_blocks(self, a: list[int], b: list[int]) -> int:
        """Number of leading full blocks equal in both token lists."""
        bs = self.block_size
        n = min(len(a), len(b)) // bs
        k = 0
        while k < n and a[k * bs:(k + 1) * bs] == b[k * bs:(k + 1) * bs]:
            k += 1
        return k

    def add(self, req: Request) -> None:
        bs = self.block_size
        req.prefix_leader = None
        req.prefix_leader_tokens = 0
        i = len(self.added)
        self.added.append(req)
        if i == 0:
            return
        prompt = req.prompt_token_ids
        shared = self._shared_blocks(self.added[i - 1].prompt_token_ids, prompt)
        start = i - 1
        while self.stack_shared and self.stack_shared[-1] >= shared:
            self.stack_shared.pop()
            start = self.stack_start.pop()
        self.stack_shared.append(shared)
        self.stack_start.append(start)
        # The follower's last prompt token is always computed by itself, so it may wait
        # for at most (len - 1) // bs blocks.
        need = min(shared, (len(prompt) - 1) // bs)
        if need < 1:
            return
        # Lowest stack level with shared >= need; its start is the earliest leader.
        level = bisect.bisect_left(self.stack_shared, need)
        req.prefix_leader = self.added[self.stack_start[level]]
        req.prefix_leader_tokens = need * bs
