"""Paged KV-cache bookkeeping: block ids, ref counts, prefix cache, LRU free list (no torch).

The KV pool is `num_blocks` physical blocks of `block_size` token slots each. A request's
`block_table` lists its physical block ids in logical order: token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Prefix cache. Every FULL block of a request's tokens has a chained hash
`h_i = hash((h_{i-1}, tuple(tokens of block i)))` (cached in `req.block_hashes`). A block whose
tokens were all computed is registered under its hash; a later request with the same leading
blocks reuses them (ref count + 1) instead of recomputing them. Hashes only find candidates;
a hit is exact because
  * the block stores its tokens, which are compared, and
  * the block stores the registration id (`cache_uid`) of the block it was computed after,
    which must be the block matched just before it. Registration ids are never reused, so
    a block whose parent was evicted (or a 64-bit hash collision anywhere in the chain) can
    never be matched. By induction the whole matched prefix equals the request's prefix.

Free list. Blocks with ref count 0 sit in an OrderedDict used as an O(1) LRU: allocation
pops the head (least recently freed). A freed block keeps its hash and stays findable until
it is popped for reuse ("evicted"). Blocks without a hash carry nothing worth keeping, so
they are freed to the head and reused first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from llmbatch.runtime.request import Request

# Parent hash of block 0 and parent registration id of a first block.
_ROOT_HASH = 0
_ROOT_UID = 0


class _Block:
    """One physical KV block. `block_hash is None` <=> not registered in the prefix cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "cache_uid", "parent_uid")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[int] = None
        self.token_ids: Optional[list[int]] = None   # the block_size tokens, for hit checks
        self.cache_uid = -1                          # registration id; -1 when unregistered
        self.parent_uid = -1                         # cache_uid of the block before it

    def __repr__(self) -> str:
        return f"_Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [_Block(i) for i in range(num_blocks)]
        # Ref-count-0 blocks, head = next to reuse. Initially 0, 1, 2, ... in order.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # block hash -> block id of the registered block.
        self._cached: dict[int, int] = {}
        self._next_uid = _ROOT_UID + 1
        # Per request holding blocks: [num blocks already registered, cache_uid of the last
        # one]. Keyed by the Request object (identity), so duplicate request ids are harmless.
        self._reg_state: dict[Request, list[int]] = {}
        # Prefix hit-rate counters, one lookup per admission (preempted requests included).
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (ref count 0, cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (held or free)."""
        return len(self._cached)

    # -- hashing -----------------------------------------------------------------------
    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        """req.block_hashes extended to at least `num_full_blocks` entries.

        A full block's tokens never change (all_token_ids only grows; speculative tokens live
        elsewhere), so hashes computed once stay valid, across preemption too.
        """
        hashes = req.block_hashes
        if len(hashes) < num_full_blocks:
            bs, tokens = self.block_size, req.all_token_ids
            parent = hashes[-1] if hashes else _ROOT_HASH
            for i in range(len(hashes), num_full_blocks):
                parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
                hashes.append(parent)
        return hashes

    # -- prefix cache lookup -----------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks equal to the request's leading tokens.

        Returns (block ids, number of tokens they hold). At most (num_tokens - 1) // bs blocks:
        the last known token is always computed so that the step can sample. No state change.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs, tokens = self.block_size, req.all_token_ids
        max_blocks = (len(tokens) - 1) // bs
        hashes = self._block_hashes(req, max_blocks)
        hits: list[int] = []
        prev_uid = _ROOT_UID
        for i in range(max_blocks):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_uid != prev_uid or block.token_ids != tokens[i * bs:(i + 1) * bs]:
                break  # hash collision or stale chain: a miss, never a wrong hit
            hits.append(block_id)
            prev_uid = block.cache_uid
        return hits, len(hits) * bs

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Optional[list[int]] = None,
                       num_lookahead_tokens: int = 0) -> Optional[list[int]]:
        """Grow req.block_table to cover its computed tokens + num_new_tokens (+ lookahead).

        `num_new_tokens` counts every token computed this step, speculative ones included (the
        scheduler passes 1 + k for a verification step). `computed_blocks` (from
        get_computed_blocks, with no allocation in between) is only allowed at admission, when
        the request holds no block; the computed token count is then len(computed_blocks) * bs
        (the caller sets req.num_computed_tokens). Returns the newly allocated block ids, or
        None, changing nothing, when the free list is too short.
        """
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError(f"request {req.request_id!r}: negative token count "
                             f"({num_new_tokens}, lookahead {num_lookahead_tokens})")
        table = req.block_table
        if table and not computed_blocks:
            # Hot path (every running request, every step): usually nothing to add.
            total = req.num_computed_tokens + num_new_tokens + num_lookahead_tokens
            num_needed = -(-total // self.block_size) - len(table)
            if num_needed <= 0:
                return []
            if num_needed > len(self._free):
                return None
            new_blocks = [self._pop_free() for _ in range(num_needed)]
            table.extend(new_blocks)
            return new_blocks
        computed_blocks = computed_blocks or []
        admission = not table
        if computed_blocks:
            if not admission:
                raise ValueError(f"request {req.request_id!r}: computed_blocks given but it "
                                 f"already holds {len(table)} blocks")
            self._check_computed(req, computed_blocks)
            num_computed = len(computed_blocks) * self.block_size
        else:
            num_computed = req.num_computed_tokens
        total = num_computed + num_new_tokens + num_lookahead_tokens
        num_needed = max(0, -(-total // self.block_size) - len(table) - len(computed_blocks))
        # Cached hits with ref count 0 leave the free list too.
        num_revived = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if num_needed + num_revived > len(self._free):
            return None

        if admission:
            self.num_queried_tokens += req.num_tokens
            self.num_hit_tokens += num_computed if computed_blocks else 0
            last_uid = self.blocks[computed_blocks[-1]].cache_uid if computed_blocks else _ROOT_UID
            self._reg_state[req] = [len(computed_blocks), last_uid]
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
        new_blocks = [self._pop_free() for _ in range(num_needed)]
        table.extend(computed_blocks)
        table.extend(new_blocks)
        return new_blocks

    def _check_computed(self, req: Request, computed_blocks: list[int]) -> None:
        """Computed blocks must still be the registered blocks of the request's hashes."""
        hashes = self._block_hashes(req, len(computed_blocks))
        for i, block_id in enumerate(computed_blocks):
            if self._cached.get(hashes[i]) != block_id:
                raise RuntimeError(
                    f"request {req.request_id!r}: computed block {block_id} was evicted or "
                    f"changed since get_computed_blocks (call allocate_slots right after it)")

    def _pop_free(self) -> int:
        """Take the LRU head; evict its prefix-cache registration if it has one."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._unregister(block)
        block.ref_cnt = 1
        return block_id

    def _unregister(self, block: _Block) -> None:
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        block.cache_uid = -1   # children registered after it can never match again
        block.parent_uid = -1

    # -- after a step ---------------------------------------------------------------------
    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that became full of computed tokens since the last call.

        Call after req.num_computed_tokens advanced and the sampled/accepted tokens were
        appended: only the first num_computed_tokens tokens are used, all of them real tokens
        (accepted speculative tokens are already in all_token_ids; rejected ones never count).
        """
        if not self.enable_prefix_caching:
            return
        state = self._reg_state.get(req)
        if state is None:
            return   # holds no blocks (finished or preempted)
        bs, tokens, table = self.block_size, req.all_token_ids, req.block_table
        start, prev_uid = state
        if req.num_computed_tokens // bs <= start:
            return   # hot path: no block completed this step
        num_full = min(req.num_computed_tokens // bs, len(table), len(tokens) // bs)
        hashes = self._block_hashes(req, num_full)
        for i in range(start, num_full):
            block_tokens = tokens[i * bs:(i + 1) * bs]
            existing_id = self._cached.get(hashes[i])
            if existing_id is not None:
                existing = self.blocks[existing_id]
                if existing.parent_uid == prev_uid and existing.token_ids == block_tokens:
                    # Same content already registered (our own hit, or a twin computed by
                    # another request): it stays canonical; our copy stays unregistered.
                    prev_uid = existing.cache_uid
                    continue
                # Stale entry (its parent was evicted) or a true collision: replace it.
                self._unregister(existing)
            block = self.blocks[table[i]]
            if block.block_hash is not None:
                self._unregister(block)
            block.block_hash = hashes[i]
            block.token_ids = block_tokens
            block.parent_uid = prev_uid
            block.cache_uid = self._next_uid
            self._next_uid += 1
            self._cached[hashes[i]] = block.block_id
            prev_uid = block.cache_uid
        state[0], state[1] = num_full, prev_uid

    def free(self, req: Request) -> None:
        """Release the request's blocks (finish or preemption). Hashes stay until eviction.

        Blocks are released last-to-first so that, among equally old blocks, the tail of a
        sequence is evicted before its head (the head is the part other requests share).
        """
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        req.block_table.clear()
        self._reg_state.pop(req, None)

    def reset_counters(self) -> None:
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (benchmarks isolate workloads with it).

        Blocks still held keep their registration, so running requests are unaffected.
        """
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._unregister(block)
