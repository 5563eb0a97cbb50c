"""Planner: trie DFS order, prefix leaders, streaming windows (no torch)."""

import random

import pytest

from llmbatch.runtime.planner import Planner
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def ids(reqs):
    return [r.request_id for r in reqs]


def leaders(reqs):
    return [(r.prefix_leader.request_id if r.prefix_leader else None, r.prefix_leader_tokens)
            for r in reqs]


def test_input_ordering_is_unchanged():
    reqs = [make_req(i, [9 - i] * 8) for i in range(5)]
    out = list(Planner("input", 2, BS).plan(reqs))
    assert out == reqs and leaders(out) == [(None, 0)] * 5


def test_input_ordering_leads_among_neighbours_and_streams():
    a = [1, 1, 1, 1, 2, 2, 2, 2]
    reqs = [make_req("ab", a + [7]), make_req("ab2", a + [8]),       # sampling.n's copies
            make_req("a", a[:4] + [3]), make_req("z", [9] * 9),
            make_req("ab3", a + [6]),             # shares with "ab", not with its neighbour
            make_req("ab4", a + [6])]
    pulled = []

    def source():
        for r in reqs:
            pulled.append(r.request_id)
            yield r

    planner = Planner("input", 100, BS)
    stream = planner.plan(source())
    assert next(stream).request_id == "ab" and pulled == ["ab"]     # nothing buffered
    out = [reqs[0]] + list(stream)
    assert out == reqs
    assert leaders(out) == [(None, 0), ("ab", 8), ("ab", 4), (None, 0), (None, 0),
                            ("ab3", 8)]
    # A new window starts a new chain: no leader across it.
    out = list(Planner("input", 2, BS).plan([make_req(i, a + [i]) for i in range(4)]))
    assert leaders(out) == [(None, 0), (0, 8), (None, 0), (2, 8)]


def test_prefix_order_and_leaders():
    a = [1, 1, 1, 1, 2, 2, 2, 2]                  # two blocks
    reqs = [
        make_req("z", [9, 9, 9, 9, 9]),
        make_req("ab-x", a + [5, 5]),
        make_req("a-y", a[:4] + [3, 3, 3, 3, 3]),
        make_req("ab-w", a + [4]),
        make_req("short", [1, 1]),                # no full block shared
        make_req("ab", a),                        # prefix of the others: sorts first
    ]
    out = list(Planner("prefix", 100, BS).plan(reqs))
    assert ids(out) == ["short", "ab", "ab-w", "ab-x", "a-y", "z"]
    assert leaders(out) == [
        (None, 0),
        (None, 0),        # "ab" shares nothing with "short"
        ("ab", 8),        # two full blocks with "ab"
        ("ab", 8),        # the earliest of the 8-token group, not its neighbour ab-w
        ("ab", 4),        # one block with the group; "ab" is the earliest holding it
        (None, 0),
    ]


def test_shared_tokens_exclude_the_followers_last_token():
    reqs = [make_req("a", range(8)), make_req("b", range(8)), make_req("c", range(5))]
    out = list(Planner("prefix", 10, BS).plan(reqs))
    # Sorted: c (prefix of the others) first, then a, b (equal: input order kept).
    assert ids(out) == ["c", "a", "b"]
    # a shares block 0 with c. b equals a, but its own last token must be computed:
    # (8 - 1) // 4 = 1 block.
    assert leaders(out) == [(None, 0), ("c", 4), ("c", 4)]


def test_leaders_reset_when_replanned():
    r = make_req("r", range(8))
    r.prefix_leader, r.prefix_leader_tokens = make_req("old", range(8)), 8
    out = list(Planner("prefix", 4, BS).plan([r]))
    assert leaders(out) == [(None, 0)]


def test_w_prefix_like_input_is_regrouped():
    """8 shared prefixes, interleaved input (request i uses prefix i % 8)."""
    rng = random.Random(5)
    prefixes = [[rng.randrange(100, 5000) for _ in range(64)] for _ in range(8)]
    reqs = [make_req(i, prefixes[i % 8] + [rng.randrange(100, 5000)
                                           for _ in range(rng.randint(3, 9))])
            for i in range(64)]
    out = list(Planner("prefix", 64, 16).plan(reqs))
    assert sorted(ids(out)) == list(range(64))
    groups = [r.request_id % 8 for r in out]
    # Each prefix's 8 requests are contiguous.
    assert all(groups[k] == groups[k - 1] for k in range(1, 64) if k % 8)
    assert len(set(groups[::8])) == 8
    for k in range(0, 64, 8):
        group = out[k:k + 8]
        assert group[0].prefix_leader is None
        assert all(r.prefix_leader is group[0] and r.prefix_leader_tokens == 64
                   for r in group[1:])


def test_windows_stream_and_group_only_within_a_window():
    pulled = []

    def source():
        for i in range(7):
            pulled.append(i)
            yield make_req(i, [i % 2] * 8 + [i])

    it = Planner("prefix", 3, BS).plan(source())
    first = next(it)
    assert len(pulled) == 3                       # one window, no more
    rest = list(it)
    out = [first] + rest
    assert ids(out) == [0, 2, 1, 4, 3, 5, 6]      # windows {0,1,2} {3,4,5} {6}
    # 6 shares a prefix with 0, 2, 4 but sits alone in the last window.
    assert leaders(out) == [(None, 0), (0, 8), (None, 0), (None, 0), (None, 0),
                            (3, 8), (None, 0)]


def test_large_token_ids_fall_back_to_list_order():
    reqs = [make_req("big", [2 ** 40] * 4 + [1]), make_req("small", [3] * 4 + [1]),
            make_req("big2", [2 ** 40] * 4 + [0])]
    out = list(Planner("prefix", 8, BS).plan(reqs))
    assert ids(out) == ["small", "big2", "big"]
    assert leaders(out) == [(None, 0), (None, 0), ("big2", 4)]


def lcp_blocks(a, b, bs):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // bs


@pytest.mark.parametrize("seed", range(20))
def test_leaders_match_brute_force(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    reqs = [make_req(i, [rng.randrange(3) for _ in range(rng.randint(1, 12))])
            for i in range(rng.randint(1, 30))]
    out = list(Planner("prefix", 100, bs).plan(reqs))
    assert all(a.prompt_token_ids <= b.prompt_token_ids for a, b in zip(out, out[1:]))
    for i, r in enumerate(out):
        best = max((lcp_blocks(out[j].prompt_token_ids, r.prompt_token_ids, bs)
                    for j in range(i)), default=0)
        need = min(best, (r.num_prompt_tokens - 1) // bs)
        if need == 0:
            assert r.prefix_leader is None
            continue
        first = min(j for j in range(i)
                    if lcp_blocks(out[j].prompt_token_ids, r.prompt_token_ids, bs) >= need)
        assert r.prefix_leader is out[first] and r.prefix_leader_tokens == need * bs


def test_bad_arguments():
    with pytest.raises(ValueError, match="ordering='random' is not one of prefix, input"):
        Planner("random", 4, BS)
    with pytest.raises(ValueError, match="window must be >= 1"):
        Planner("prefix", 0, BS)
    with pytest.raises(ValueError, match="block_size"):
        Planner("prefix", 4, 0)
