"""Scheduler + BlockManager driven by a fake model (no torch).

The fake model writes every computed token into a fake paged KV pool through the block table
and samples a token that hashes the context READ BACK from that pool: a wrong block id, a wrong
prefix hit or a lost token changes the outputs. So the outputs must not depend on pool size
(preemption), token budget (chunking), prefix caching or draft tokens.
"""

import random

import pytest

from llmbatch.runtime.planner import Planner
from llmbatch.runtime.request import FinishReason
from tests.runtime.test_scheduler import BS, VOCAB, make_req, make_sched


def next_token(context):
    return hash(tuple(context)) % VOCAB


class FakeModel:
    """A paged 'KV pool' of token ids; sampling reads the whole context back from it."""

    def __init__(self, num_blocks, bs):
        self.bs = bs
        self.pool = [None] * (num_blocks * bs)

    def slot(self, req, pos):
        return req.block_table[pos // self.bs] * self.bs + pos % self.bs

    def execute(self, out):
        sampled = {}
        for item in out.scheduled:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            span = (req.all_token_ids + req.spec_token_ids)[start:start + n]
            assert len(span) == n
            for pos, tok in enumerate(span, start):
                self.pool[self.slot(req, pos)] = tok
            if not item.samples:
                continue
            context = [self.pool[self.slot(req, p)] for p in range(start + n)]
            result = []
            for j in range(len(req.spec_token_ids) + 1):   # verify drafts left to right
                tok = next_token(context[:req.num_tokens + j])
                result.append(tok)
                if j == len(req.spec_token_ids) or req.spec_token_ids[j] != tok:
                    break
            sampled[req.request_id] = result
        return sampled


def expected_output(prompt, max_new):
    seq = list(prompt)
    for _ in range(max_new):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def simulate(reqs, num_blocks, budget, max_seqs=8, prefix=True, spec_k=0, planner=None, bs=BS):
    sched, bm = make_sched(num_blocks, budget, max_seqs, prefix, bs=bs)
    model = FakeModel(num_blocks, bs)
    rng = random.Random(0)
    for r in (planner.plan(reqs) if planner else reqs):
        sched.add_request(r)
    num_steps = 0
    while sched.has_unfinished_requests():
        for r in sched.running:                   # replay proposer, some drafts corrupted
            if spec_k and r.num_computed_tokens == r.num_tokens - 1:
                truth = expected_output(r.prompt_token_ids, r.num_output_tokens + spec_k)
                r.spec_token_ids = [t if rng.random() < 0.7 else VOCAB + 1
                                    for t in truth[r.num_output_tokens:]]
        out = sched.schedule()
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= budget
        assert sched.num_running <= max_seqs
        sched.update_from_output(out, model.execute(out))
        for s in out.scheduled:
            r = s.request
            if r.num_output_tokens >= r.sampling_params.max_new_tokens:
                del r.output_token_ids[r.sampling_params.max_new_tokens:]
                sched.finish_request(r, FinishReason.LENGTH)
        num_steps += 1
        assert num_steps < 10_000
    assert bm.num_free_blocks == num_blocks       # everything released
    return sched, bm


def sim_requests(seed=1, n=12):
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(10)]
    reqs = []
    for i in range(n):
        head = shared if i % 2 else []
        tail = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 14))]
        reqs.append(make_req(i, head + tail, max_new=rng.randint(1, 9)))
    return reqs


@pytest.mark.parametrize("num_blocks, budget, prefix, spec_k", [
    (200, 256, True, 0),     # roomy
    (200, 5, True, 0),       # heavy chunking
    (9, 64, True, 0),        # tight pool: preemptions
    (9, 7, False, 0),        # tight pool, chunking, no prefix cache
    (200, 64, True, 3),      # speculative verification
    (9, 6, True, 2),         # everything at once
])
def test_simulation_outputs_do_not_depend_on_scheduling(num_blocks, budget, prefix, spec_k):
    reqs = sim_requests()
    sched, bm = simulate(reqs, num_blocks, budget, prefix=prefix, spec_k=spec_k)
    for r in reqs:
        assert r.is_finished
        assert r.output_token_ids == expected_output(r.prompt_token_ids,
                                                     r.sampling_params.max_new_tokens)
    if num_blocks == 9:
        assert sched.num_preemptions > 0          # the tight pool really preempted
    if spec_k:
        assert sum(r.num_spec_accepted_tokens for r in reqs) > 0


def test_simulation_with_planner_leaders():
    reqs = sim_requests(seed=3, n=16)
    simulate(reqs, 40, 16, planner=Planner("prefix", 8, BS))
    for r in reqs:
        assert r.output_token_ids == expected_output(r.prompt_token_ids,
                                                     r.sampling_params.max_new_tokens)


def w_prefix_requests(num_requests=256, num_prefixes=8, prefix_len=1024, seed=0):
    """W-PREFIX shape (BENCH.md): request i = prefix i % 8 + unique tail of U[32, 128]."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 32000) for _ in range(prefix_len)]
                for _ in range(num_prefixes)]
    reqs = []
    for i in range(num_requests):
        tail = [rng.randrange(100, 32000) for _ in range(rng.randint(32, 128))]
        reqs.append(make_req(i, prefixes[i % num_prefixes] + tail, max_new=2))
    return reqs


@pytest.mark.parametrize("num_blocks", [4000, 1000])
def test_w_prefix_reaches_85_percent_cached(num_blocks):
    reqs = w_prefix_requests()
    sched, bm = simulate(reqs, num_blocks=num_blocks, budget=8192, max_seqs=256, bs=16,
                         planner=Planner("prefix", 4096, 16))
    cached = sum(r.num_cached_tokens for r in reqs)
    prompt = sum(r.num_prompt_tokens for r in reqs)
    if num_blocks == 4000:
        # Every follower (31 per prefix) hits the whole 1024-token prefix; leaders hit nothing.
        assert cached == 8 * 31 * 1024
        assert bm.num_hit_tokens == cached and bm.num_queried_tokens == prompt
    # 1000 blocks hold under 15 such requests: prefixes get evicted and stand-ins recompute.
    assert cached / prompt >= 0.85
    for r in reqs[:16]:
        assert r.output_token_ids == expected_output(r.prompt_token_ids, 2)


