"""Scheduler.fits_without_preemption (scheduler_async.py): its O(1) exit and its loop, on real
Scheduler/BlockManager objects (no torch, no model)."""

import random

from llmbatch.runtime.block_manager import BlockManager
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.request import FinishReason, Request, RequestStatus
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.scheduler import Scheduler


def make_sched(num_blocks, budget, bs=4, max_seqs=8, max_model_len=None, prefix=True):
    cfg = EngineConfig(model="unused", block_size=bs, max_num_batched_tokens=budget,
                       max_num_seqs=max_seqs, prefix_caching=prefix)
    bm = BlockManager(num_blocks, bs, prefix)
    return Scheduler(cfg, bm, max_model_len=max_model_len), bm


def loop_fits(sched) -> bool:
    """The per-request bound of fits_without_preemption, without its early exit: each running
    request may get blocks for all its known, pending and draft tokens, capped at one budget."""
    bs, budget = sched.block_size, sched.max_num_batched_tokens
    needed = sum(max(0, -(-min(r.num_tokens + r.num_pending_tokens + len(r.spec_token_ids),
                                 r.num_computed_tokens + budget) // bs) - len(r.block_table))
                 for r in sched.running)
    return needed <= sched.block_manager.num_free_blocks


def early_exit_bound(sched) -> int:
    """Free blocks from which fits_without_preemption answers True without the loop."""
    return -(-sched.max_num_batched_tokens // sched.block_size) + len(sched.running)


def sampling(out):
    """The requests of a scheduled step that sample (taken before commit_launched)."""
    return [item.request for item in out.scheduled if item.samples]


def tight_state(num_blocks):
    """bs 4, budget 16. Running [a, b] after one committed async step: a (4-token prompt)
    decodes at a block boundary with its token pending, so it needs 1 new block; b (28-token
    prompt) holds 3 blocks for its 12 computed tokens and may get 15 more this step, 4 new
    blocks. schedule() takes 5 blocks; the pool has num_blocks - 4 free."""
    sched, bm = make_sched(num_blocks, budget=16)
    a = Request("a", list(range(4)), SamplingParams(max_new_tokens=8))
    b = Request("b", list(range(100, 128)), SamplingParams(max_new_tokens=8))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4),
                                                                                 ("b", 12)]
    sched.commit_launched(out)
    assert (a.num_computed_tokens, a.num_pending_tokens, len(a.block_table)) == (4, 1, 1)
    assert (b.num_computed_tokens, b.num_pending_tokens, len(b.block_table)) == (12, 0, 3)
    assert bm.num_free_blocks == num_blocks - 4
    return sched, bm, a, b


def test_below_the_early_exit_bound_the_loop_decides_false_and_schedule_would_preempt():
    # 4 free blocks: at least ceil(16 / 4) = 4 and at least N = 2, so a shortcut that forgot
    # either term of ceil(B / bs) + N = 6 would answer True here.
    sched, bm, a, b = tight_state(num_blocks=8)
    assert bm.num_free_blocks == 4 < early_exit_bound(sched) == 6
    assert sched.fits_without_preemption() is False
    # ... and it must be False: schedule() gives a its block, then has 3 for b's 4.
    out = sched.schedule()
    assert out.preempted == [b] and [s.request for s in out.scheduled] == [a]
    # b's own 3 blocks went back to the pool: 4 - 1 + 3.
    assert len(a.block_table) == 2 and b.block_table == [] and bm.num_free_blocks == 6


def test_below_the_early_exit_bound_the_loop_decides_true_when_the_blocks_suffice():
    # 5 free blocks = exactly what schedule() takes (1 + 4): the bound's N term is not slack
    # that a shortcut could drop (ceil(B / bs) + N - 1 = 5 blocks are really taken).
    sched, bm, a, b = tight_state(num_blocks=9)
    assert bm.num_free_blocks == 5 < early_exit_bound(sched)
    assert sched.fits_without_preemption() is True
    out = sched.schedule()
    assert out.preempted == []
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1),
                                                                                 ("b", 15)]
    assert (len(a.block_table), len(b.block_table), bm.num_free_blocks) == (2, 7, 0)


def test_at_the_early_exit_bound_no_running_request_is_read():
    # O(1): with ceil(B / bs) + N blocks free the answer is True whatever the requests hold;
    # stand-ins that fail on any attribute read prove the loop did not run.
    sched, bm = make_sched(num_blocks=6, budget=16)
    sched.running = [object(), object()]     # bound: ceil(16 / 4) + 2 = 6 = all free blocks
    assert sched.fits_without_preemption() is True
    bm.allocate_slots(Request("x", [1], SamplingParams()), 1)   # 5 free: the loop runs
    try:
        sched.fits_without_preemption()
    except AttributeError:
        pass
    else:
        raise AssertionError("the loop should have read the running requests")


def run_async_engine_like(seed, num_blocks, budget, bs, max_seqs, max_model_len, counts):
    """Drive a scheduler the way Engine._step_async does (one step in flight; a step is planned
    over it only when fits_without_preemption() says so, else the step in flight is collected
    first), with random prompts, lengths, arrivals and stops. At every check, the answer must
    equal the loop's, and a True must be followed by a schedule() that preempts no one."""
    rng = random.Random(seed)
    sched, bm = make_sched(num_blocks, budget, bs, max_seqs, max_model_len)
    vocab = 50   # small: prompts share prefixes, so the prefix cache hits too
    todo = [Request(i, [rng.randrange(vocab) for _ in range(rng.randint(1, 6 * bs))],
                    SamplingParams(max_new_tokens=rng.randint(1, 3 * bs)))
            for i in range(40)]
    in_flight = None   # (SchedulerOutput, its sampling requests)
    for _ in range(3000):
        while todo and rng.random() < 0.3:
            sched.add_request(todo.pop())
        if not sched.has_unfinished_requests() and in_flight is None:
            if not todo:
                break
            continue
        out = None
        if in_flight is None:
            out = sched.schedule()
        else:
            fits = sched.fits_without_preemption()
            assert fits == loop_fits(sched)
            exit_taken = bm.num_free_blocks >= early_exit_bound(sched)
            counts[("early exit" if exit_taken else "loop", fits)] += 1
            if fits:
                out = sched.schedule()
                assert out.preempted == []
        new = None
        if out is not None and out.scheduled:
            samplers = sampling(out)
            sched.commit_launched(out)
            new = (out, samplers)
        if in_flight is not None:
            prev, samplers = in_flight
            sched.apply_sampled(prev, {r.request_id: [rng.randrange(vocab)] for r in samplers})
            for r in samplers:
                if r.status is not RequestStatus.RUNNING:
                    continue
                if (r.num_output_tokens >= r.sampling_params.max_new_tokens
                        or (max_model_len is not None and r.num_tokens >= max_model_len)):
                    sched.finish_request(r, FinishReason.LENGTH)
                elif rng.random() < 0.05:
                    sched.finish_request(r, FinishReason.STOP)
        in_flight = new
    assert not todo and not sched.has_unfinished_requests() and in_flight is None
    assert bm.num_free_blocks == num_blocks


def test_fits_equals_the_loop_on_random_async_engine_states():
    counts = {(path, fits): 0 for path in ("early exit", "loop") for fits in (True, False)}
    settings = [  # (num_blocks, budget, bs, max_seqs, max_model_len)
        (14, 16, 4, 6, None), (16, 8, 4, 8, 30), (16, 32, 8, 4, None), (20, 12, 2, 8, None),
        (24, 64, 4, 8, 40), (12, 16, 4, 8, None)]
    for seed in range(6):
        for num_blocks, budget, bs, max_seqs, max_model_len in settings:
            run_async_engine_like(seed, num_blocks, budget, bs, max_seqs, max_model_len, counts)
    # Every path was taken, many times (True below the bound: the loop still decides).
    assert counts[("early exit", False)] == 0
    assert min(counts[("early exit", True)], counts[("loop", True)],
               counts[("loop", False)]) >= 100, counts


def test_fits_true_means_schedule_preempts_no_one_with_drafts():
    # Synchronous steps with random drafts (up to 7) on the running requests, chunked prefill:
    # states the async engine does not reach, where the early exit can answer True where the
    # loop says False. True must still mean that schedule() preempts no one, and the blocks
    # the running requests take stay within the proof's bound, ceil(B / bs) + N - 1.
    disagreements = 0
    for seed in range(100):
        rng = random.Random(seed)
        bs, budget = rng.choice([1, 2, 4, 8]), rng.randint(4, 24)
        alone = -(-60 // bs)   # blocks of the longest request: 40 prompt + 20 output tokens
        num_blocks = rng.randint(alone, 2 * alone)
        sched, bm = make_sched(num_blocks, budget, bs, max_seqs=rng.randint(4, 8))
        for i in range(30):
            sched.add_request(Request(i, [rng.randrange(50) for _ in range(rng.randint(1, 40))],
                                      SamplingParams(max_new_tokens=rng.randint(1, 20))))
        for _ in range(2000):
            if not sched.has_unfinished_requests():
                break
            for r in sched.running:
                r.spec_token_ids = [rng.randrange(50) for _ in range(rng.choice([0, 1, 3, 7]))]
            fits = sched.fits_without_preemption()
            assert fits == (loop_fits(sched) or bm.num_free_blocks >= early_exit_bound(sched))
            disagreements += fits != loop_fits(sched)
            before = {r: len(r.block_table) for r in sched.running}
            out = sched.schedule()
            if fits:
                assert out.preempted == []
            if not out.preempted:
                taken = sum(len(r.block_table) - n for r, n in before.items())
                assert taken <= -(-budget // bs) + len(before) - 1
            sampled = {}
            for item in out.scheduled:
                r = item.request
                if item.samples:   # a random prefix of the drafts is accepted
                    sampled[r.request_id] = [rng.randrange(50) for _ in range(
                        1 + rng.randint(0, len(r.spec_token_ids)))]
            sched.update_from_output(out, sampled)
            for r in list(sched.running):
                if r.num_output_tokens >= r.sampling_params.max_new_tokens:
                    sched.finish_request(r, FinishReason.LENGTH)
        assert not sched.has_unfinished_requests()
    assert disagreements >= 20   # the early exit did answer for states the loop could not
