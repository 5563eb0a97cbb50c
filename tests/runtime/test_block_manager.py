"""BlockManager: exact block ids, prefix hits, LRU eviction order, ref counts (no torch)."""

import pytest

from llmbatch.runtime.block_manager import BlockManager
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def admit(bm, req, num_new=None):
    """Admission as the scheduler does it: prefix lookup, allocate, set num_computed."""
    blocks, num_cached = bm.get_computed_blocks(req)
    num_new = req.num_tokens - num_cached if num_new is None else num_new
    new = bm.allocate_slots(req, num_new, blocks)
    assert new is not None
    req.num_computed_tokens = num_cached
    return blocks, new


def compute(bm, req, num_tokens):
    """Pretend the model computed `num_tokens` more tokens, then register full blocks."""
    req.num_computed_tokens += num_tokens
    bm.cache_full_blocks(req)


def free_order(bm):
    return list(bm._free)


def test_allocate_exact_block_ids_and_growth():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(10))
    assert bm.allocate_slots(a, 10) == [0, 1, 2]
    assert a.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2) == []          # 12 tokens still fit in 3 blocks
    assert bm.allocate_slots(a, 3) == [3]         # 13 tokens need a 4th
    assert a.block_table == [0, 1, 2, 3]
    assert bm.allocate_slots(a, 1, num_lookahead_tokens=6) == [4]   # 17 slots -> 5 blocks


def test_allocate_failure_changes_nothing():
    bm = BlockManager(4, BS, True)
    a = make_req("a", range(12))
    admit(bm, a)
    compute(bm, a, 12)
    bm.free(a)                                    # blocks 0..2 cached, free
    b = make_req("b", list(range(8)) + [90, 91, 92, 93, 94, 95, 96, 97, 98])  # 17 tokens
    hits, num = bm.get_computed_blocks(b)
    assert (hits, num) == ([0, 1], 8)
    before = (free_order(bm), dict(bm._cached), [x.ref_cnt for x in bm.blocks])
    # 17 tokens need 5 blocks; the pool has 4.
    assert bm.allocate_slots(b, 9, hits) is None
    assert b.block_table == []
    assert (free_order(bm), dict(bm._cached), [x.ref_cnt for x in bm.blocks]) == before
    assert bm.num_queried_tokens == 12 and bm.num_hit_tokens == 0


def test_prefix_hit_shares_blocks_and_counts():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(10))
    admit(bm, a)
    compute(bm, a, 10)                            # blocks 0, 1 full and registered
    assert bm.num_cached_blocks == 2
    b = make_req("b", list(range(8)) + [50, 51, 52])
    hits, new = admit(bm, b)
    assert hits == [0, 1] and new == [3]
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (21, 8)
    assert bm.prefix_hit_rate == pytest.approx(8 / 21)


def test_last_token_is_never_a_hit():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(8))
    admit(bm, a)
    compute(bm, a, 8)                             # both blocks full and registered
    same = make_req("same", range(8))
    assert bm.get_computed_blocks(same) == ([0], 4)   # (8 - 1) // 4 = 1 block
    longer = make_req("longer", range(9))
    assert bm.get_computed_blocks(longer) == ([0, 1], 8)


def test_get_computed_blocks_does_not_change_state():
    bm = BlockManager(6, BS, True)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    bm.free(a)
    before = (free_order(bm), [x.ref_cnt for x in bm.blocks], bm.num_queried_tokens)
    assert bm.get_computed_blocks(make_req("b", range(9))) == ([0, 1], 8)
    assert (free_order(bm), [x.ref_cnt for x in bm.blocks], bm.num_queried_tokens) == before


def test_lru_eviction_order():
    bm = BlockManager(6, BS, True)
    a = make_req("a", range(12))
    admit(bm, a)
    compute(bm, a, 12)                            # blocks 0, 1, 2 registered
    bm.free(a)
    # Never-used blocks first, then a's blocks tail-first (released last-to-first).
    assert free_order(bm) == [3, 4, 5, 2, 1, 0]
    c = make_req("c", [100 + i for i in range(16)])
    assert bm.allocate_slots(c, 16) == [3, 4, 5, 2]   # evicts a's last block only
    assert bm.num_cached_blocks == 2
    d = make_req("d", range(12))
    assert bm.get_computed_blocks(d) == ([0, 1], 8)


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, BS, True)
    a = make_req("a", range(6))
    admit(bm, a)
    compute(bm, a, 6)                             # block 0 full; block 1 half full
    bm.free(a)
    assert free_order(bm) == [1, 2, 3, 0]         # unhashed 1 to the head, cached 0 last
    e = make_req("e", [70] * 12)
    assert bm.allocate_slots(e, 12) == [1, 2, 3]
    assert bm.get_computed_blocks(make_req("f", range(6))) == ([0], 4)


def test_ref_counts_and_free():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    b = make_req("b", range(9))
    admit(bm, b)                                  # hits blocks 0, 1
    assert b.block_table == [0, 1, 3]
    bm.free(a)
    assert [bm.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert 0 not in bm._free and 2 in bm._free and a.block_table == []
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(x.ref_cnt == 0 for x in bm.blocks)
    bm.free(b)                                    # nothing held: a no-op
    assert bm.num_free_blocks == 8


def test_hit_on_free_block_removes_it_from_free_list():
    bm = BlockManager(4, BS, True)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    bm.free(a)
    b = make_req("b", range(9))
    hits, new = admit(bm, b)
    assert hits == [0, 1] and new == [2]          # block 2 was unhashed: at the head
    assert free_order(bm) == [3]


def test_preempted_request_rehits_its_own_blocks():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(6))
    admit(bm, a)
    compute(bm, a, 6)
    for t in (60, 61, 62):                        # decode: three sampled tokens
        a.append_output_token(t)
        assert bm.allocate_slots(a, 1) is not None
        compute(bm, a, 1)
    assert a.num_computed_tokens == 9 and a.num_tokens == 9
    hashes = list(a.block_hashes)
    table = list(a.block_table)
    bm.free(a)                                    # preemption
    a.num_computed_tokens = 0
    assert a.block_hashes == hashes               # cached on the request, still valid
    hits, new = admit(bm, a)
    assert hits == table[:2] and a.num_computed_tokens == 8


def test_token_comparison_defeats_hash_collision():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    b = make_req("b", [7, 7, 7, 7, 8, 8, 8, 8, 9])
    b.block_hashes = list(a.block_hashes)         # forged: every hash collides with a's
    assert bm.get_computed_blocks(b) == ([], 0)


def test_parent_check_defeats_chained_collision():
    """A block with the right tokens but computed after a different parent never hits."""
    bm = BlockManager(8, BS, True)
    r1 = make_req("r1", [1, 1, 1, 1, 5, 5, 5, 5, 0])
    r2 = make_req("r2", [2, 2, 2, 2, 5, 5, 5, 5, 0])
    for r in (r1, r2):
        admit(bm, r)
        compute(bm, r, 9)
    q = make_req("q", [2, 2, 2, 2, 5, 5, 5, 5, 0])
    bm._block_hashes(q, 2)
    assert bm.get_computed_blocks(q) == (r2.block_table[:2], 8)
    # Forge q's second hash to r1's: same tokens, but r1's block follows another parent.
    q.block_hashes[1] = r1.block_hashes[1]
    assert bm.get_computed_blocks(q) == (r2.block_table[:1], 4)


def test_twin_blocks_keep_the_first_registration():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(9))
    b = make_req("b", range(9))
    admit(bm, a)
    admit(bm, b)                                  # same step: nothing cached yet
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    compute(bm, a, 9)
    compute(bm, b, 9)
    assert bm.num_cached_blocks == 2 and bm.blocks[3].block_hash is None
    bm.free(a)
    c = make_req("c", list(range(8)) + [40, 41])
    assert bm.get_computed_blocks(c) == ([0, 1], 8)


def test_speculative_tokens_never_cached():
    bm = BlockManager(8, BS, True)
    a = make_req("a", range(7))
    admit(bm, a)
    compute(bm, a, 7)
    a.append_output_token(70)                     # 8 known tokens, 7 computed
    a.spec_token_ids = [71, 72, 73]
    assert bm.allocate_slots(a, 4) == [2]         # slots for positions 7..10
    # All drafts rejected: only the last known token became computed.
    compute(bm, a, 1)
    assert bm.num_cached_blocks == 2
    assert bm.blocks[1].token_ids == [4, 5, 6, 70]
    assert bm.blocks[2].block_hash is None        # slots 8..10 held drafts, never cached


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, False)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_req("b", range(9))) == ([], 0)
    bm.free(a)
    # Unhashed blocks go to the head one by one (2, then 1, then 0): reused first, in order.
    assert free_order(bm) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS, True)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0, True)
    bm = BlockManager(4, BS, True)
    a = make_req("a", range(5))
    with pytest.raises(ValueError, match="negative"):
        bm.allocate_slots(a, -1)
    bm.allocate_slots(a, 5)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate_slots(a, 1, [0])


def test_stale_computed_blocks_rejected():
    bm = BlockManager(3, BS, True)
    a = make_req("a", range(9))
    admit(bm, a)
    compute(bm, a, 9)
    bm.free(a)
    b = make_req("b", range(9))
    hits, _ = bm.get_computed_blocks(b)
    bm.allocate_slots(make_req("c", [50] * 12), 12)   # evicts everything
    with pytest.raises(RuntimeError, match="evicted"):
        bm.allocate_slots(b, 1, hits)


def test_reset_prefix_cache_forgets_free_blocks_only():
    from llmbatch.runtime.block_manager import BlockManager
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams

    bm = BlockManager(num_blocks=8, block_size=4)
    held = Request("held", list(range(9)), SamplingParams())
    done = Request("done", list(range(100, 109)), SamplingParams())
    for req in (held, done):
        assert bm.allocate_slots(req, 9) is not None
        req.num_computed_tokens = 9
        bm.cache_full_blocks(req)
    bm.free(done)
    assert bm.num_cached_blocks == 4
    bm.reset_prefix_cache()
    # The held request's two full blocks stay registered; the freed ones are forgotten.
    assert bm.num_cached_blocks == 2
    probe = Request("probe", list(range(100, 109)), SamplingParams())
    assert bm.get_computed_blocks(probe) == ([], 0)
    again = Request("again", list(range(9)), SamplingParams())
    assert bm.get_computed_blocks(again) == (held.block_table[:2], 8)
