"""Scheduler: budget, chunking, admission, preemption, leader gating, spec accounting (no torch).

The fake-model simulation lives in test_scheduler_simulation.py.
"""

import subprocess
import sys

import pytest

from llmbatch.runtime.block_manager import BlockManager
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.request import FinishReason, Request, RequestStatus
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.scheduler import Scheduler

BS = 4
VOCAB = 1000


def make_sched(num_blocks=64, budget=64, max_seqs=8, prefix=True, max_model_len=None, bs=BS):
    cfg = EngineConfig(model="unused", block_size=bs, max_num_batched_tokens=budget,
                       max_num_seqs=max_seqs, prefix_caching=prefix)
    bm = BlockManager(num_blocks, bs, prefix)
    return Scheduler(cfg, bm, max_model_len=max_model_len), bm


def make_req(rid, tokens, max_new=4):
    return Request(rid, list(tokens), SamplingParams(max_new_tokens=max_new))


def steps(out):
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def run_step(sched, tokens=None):
    """schedule + update, sampling `tokens[id]` (default 1 token, 7) for requests that sample."""
    out = sched.schedule()
    sampled = {}
    for s in out.scheduled:
        if s.samples:
            sampled[s.request.request_id] = (tokens or {}).get(s.request.request_id, [7])
    sched.update_from_output(out, sampled)
    return out


# -- budget, chunking, order ------------------------------------------------------------------
def test_chunked_prefill_and_budget():
    sched, _ = make_sched(budget=10)
    a, b = make_req("a", range(25)), make_req("b", range(100, 106))
    sched.add_request(a)
    sched.add_request(b)
    out = run_step(sched)
    assert steps(out) == [("a", 10)] and out.num_batched_tokens == 10
    assert a.num_computed_tokens == 10 and a.num_output_tokens == 0
    assert steps(run_step(sched)) == [("a", 10)]
    out = sched.schedule()                       # a finishes its prompt; b gets the rest
    assert steps(out) == [("a", 5), ("b", 5)]
    assert [s.samples for s in out.scheduled] == [True, False]
    sched.update_from_output(out, {"a": [7]})
    assert a.output_token_ids == [7] and a.num_computed_tokens == 25
    assert b.output_token_ids == [] and b.num_computed_tokens == 5
    assert steps(run_step(sched)) == [("a", 1), ("b", 1)]   # decode first, then b's last token
    assert b.output_token_ids == [7]


def test_running_first_then_waiting_in_order_and_max_num_seqs():
    sched, _ = make_sched(budget=100, max_seqs=2)
    reqs = [make_req(i, range(10 * i, 10 * i + 5)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    assert steps(run_step(sched)) == [(0, 5), (1, 5)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.finish_request(reqs[0], FinishReason.STOP)
    assert reqs[0].status == RequestStatus.FINISHED and reqs[0].block_table == []
    assert steps(run_step(sched)) == [(1, 1), (2, 5)]
    assert reqs[2].first_scheduled_time is not None


def test_prefix_hit_at_admission_sets_cached_tokens_once():
    sched, bm = make_sched(budget=100)
    a = make_req("a", range(10))
    sched.add_request(a)
    run_step(sched)
    b = make_req("b", list(range(9)) + [99])
    sched.add_request(b)
    out = run_step(sched)
    assert steps(out) == [("a", 1), ("b", 2)]     # b starts at 8 cached tokens
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert a.num_cached_tokens == 0


def test_preemption_of_most_recent_request():
    # 4 blocks of 4: a (7 tokens) and b (5 tokens) hold 2 blocks each.
    sched, bm = make_sched(num_blocks=4, budget=100)
    a, b = make_req("a", range(7)), make_req("b", range(50, 55))
    c = make_req("c", range(80, 83))
    for r in (a, b, c):
        sched.add_request(r)
    assert steps(run_step(sched)) == [("a", 7), ("b", 5)]   # c does not fit
    b_blocks = list(b.block_table)
    out = run_step(sched)                         # a: 8 tokens fit; b: 6 tokens fit
    assert steps(out) == [("a", 1), ("b", 1)] and out.preempted == []
    out = sched.schedule()                        # a needs block 5 of 4 -> preempt b
    assert out.preempted == [b] and steps(out) == [("a", 1)]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [b, c]          # front of the queue, ahead of c
    assert b.output_token_ids == [7, 7]           # outputs stay, recomputed later
    assert bm.blocks[b_blocks[0]].block_hash is not None   # b's full block stays cached


def test_self_preemption_then_clear_error():
    sched, _ = make_sched(num_blocks=2, budget=100)
    a = make_req("a", range(7), max_new=10)
    sched.add_request(a)
    run_step(sched)                               # 8 tokens known, 7 computed
    run_step(sched)                               # 9 known: the 3rd block is needed next
    out = sched.schedule()
    assert out.preempted == [a] and out.scheduled == []
    assert a.status == RequestStatus.WAITING and a.num_preemptions == 1
    with pytest.raises(RuntimeError, match="does not fit in the KV pool"):
        sched.schedule()


def test_no_admission_in_a_step_that_preempted():
    sched, _ = make_sched(num_blocks=3, budget=100)
    a, b = make_req("a", range(4)), make_req("b", range(20, 24))
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)                               # a, b: 1 block each; 5 known tokens each
    small = make_req("s", [1])
    sched.add_request(small)
    out = sched.schedule()                        # a takes block 2, b needs one: preempted
    assert steps(out) == [("a", 1)] and out.preempted == [b]
    assert list(sched.waiting) == [b, small]


# -- leader gating ------------------------------------------------------------------------------
def test_follower_waits_for_leader_without_blocking_others():
    sched, _ = make_sched(budget=6)
    leader = make_req("L", range(12))
    follower = make_req("F", list(range(8)) + [90, 91])
    other = make_req("O", [500, 501])
    follower.prefix_leader, follower.prefix_leader_tokens = leader, 8
    for r in (leader, follower, other):
        sched.add_request(r)
    assert steps(run_step(sched)) == [("L", 6)]
    # L has 6 < 8 computed: F is skipped, O behind it is admitted.
    assert steps(run_step(sched)) == [("L", 6)]   # budget used up by L: nobody else
    out = run_step(sched)                         # L decodes; F now hits 8 tokens
    assert steps(out) == [("L", 1), ("F", 2), ("O", 2)]
    assert follower.num_cached_tokens == 8
    assert list(sched.waiting) == []


def test_skipped_follower_keeps_its_place():
    sched, _ = make_sched(budget=7)
    leader = make_req("L", range(12))
    f = make_req("F", list(range(8)) + [90])
    o = make_req("O", [500, 501])
    f.prefix_leader, f.prefix_leader_tokens = leader, 8
    for r in (leader, f, o):
        sched.add_request(r)
    assert steps(run_step(sched)) == [("L", 7)]
    out = run_step(sched)
    assert steps(out) == [("L", 5), ("O", 2)]     # F skipped, O admitted behind it
    assert list(sched.waiting) == [f]


def test_finished_or_foreign_leader_does_not_gate():
    sched, _ = make_sched(budget=100)
    done = make_req("done", range(12))
    done.status = RequestStatus.FINISHED
    never_added = make_req("x", range(12))
    f1 = make_req("f1", list(range(8)) + [1])
    f2 = make_req("f2", list(range(8)) + [2])
    f1.prefix_leader, f1.prefix_leader_tokens = done, 8
    f2.prefix_leader, f2.prefix_leader_tokens = never_added, 8
    sched.add_request(f1)
    sched.add_request(f2)
    assert steps(run_step(sched)) == [("f1", 9), ("f2", 9)]


def test_stand_in_recomputes_an_evicted_prefix_once():
    """Leader finished and its prefix is gone: the first follower recomputes it, the others
    wait for that stand-in instead of all recomputing the prefix in the same step."""
    sched, _ = make_sched(budget=100)
    gone = make_req("gone", range(12))
    gone.status = RequestStatus.FINISHED          # e.g. done in an earlier run: nothing cached
    f1 = make_req("f1", list(range(8)) + [1])
    f2 = make_req("f2", list(range(8)) + [2])
    other = make_req("o", [600, 601])
    for f in (f1, f2):
        f.prefix_leader, f.prefix_leader_tokens = gone, 8
    for r in (f1, f2, other):
        sched.add_request(r)
    assert steps(run_step(sched)) == [("f1", 9), ("o", 2)]
    assert f1.num_cached_tokens == 0
    assert steps(run_step(sched)) == [("f1", 1), ("o", 1), ("f2", 1)]
    assert f2.num_cached_tokens == 8


def test_preempted_stand_in_does_not_wait_for_itself():
    sched, _ = make_sched(num_blocks=4, budget=100)
    a = make_req("a", range(20, 27), max_new=10)
    gone = make_req("gone", [0, 1, 2, 3, 9])
    gone.status = RequestStatus.FINISHED
    f1 = make_req("f1", [0, 1, 2, 3, 1], max_new=10)
    f2 = make_req("f2", [0, 1, 2, 3, 2])
    for f in (f1, f2):
        f.prefix_leader, f.prefix_leader_tokens = gone, 4
    for r in (a, f1, f2):
        sched.add_request(r)
    assert steps(run_step(sched)) == [("a", 7), ("f1", 5)]   # f1 stands in; f2 waits
    assert steps(run_step(sched)) == [("a", 1), ("f1", 1)]   # f2 would hit, but no block
    out = run_step(sched)
    assert out.preempted == [f1] and steps(out) == [("a", 1)]
    sched.finish_request(a, FinishReason.LENGTH)
    out = run_step(sched)                         # f1 back, rehitting its own block 0
    assert steps(out) == [("f1", 3), ("f2", 1)]
    assert f1.num_computed_tokens == 7 and f1.num_cached_tokens == 0   # first admission's
    assert f2.num_cached_tokens == 4 and f2.block_table[0] == f1.block_table[0]


# -- speculative verification -----------------------------------------------------------------
def decode_ready(sched, prompt=range(6)):
    a = make_req("a", prompt, max_new=50)
    sched.add_request(a)
    run_step(sched)                               # prefill: 7 known, 6 computed
    return a


@pytest.mark.parametrize("sampled, accepted", [([11], 0), ([71, 12], 1), ([71, 72, 73, 13], 3)])
def test_spec_accounting(sampled, accepted):
    sched, bm = make_sched(budget=100)
    a = decode_ready(sched)
    a.spec_token_ids = [71, 72, 73]
    out = sched.schedule()
    assert steps(out) == [("a", 4)] and out.scheduled[0].samples
    sched.update_from_output(out, {"a": sampled})
    # computed += num_new - rejected = 4 - (3 - (m - 1)) = m
    assert a.num_computed_tokens == 6 + len(sampled)
    assert a.num_computed_tokens == a.num_tokens - 1       # back in decode state
    assert a.output_token_ids == [7] + sampled
    assert a.num_spec_accepted_tokens == accepted and a.spec_token_ids == []
    # Cached blocks hold only real tokens: block 1 = positions 4..7.
    if a.num_computed_tokens >= 8:
        assert bm.blocks[a.block_table[1]].token_ids == [4, 5, 7, 71]


def test_spec_trimmed_to_budget_and_context():
    sched, _ = make_sched(budget=3)
    a = decode_ready(sched, prompt=range(2))      # 3 known, 2 computed
    a.spec_token_ids = [1, 2, 3, 4]
    out = sched.schedule()
    assert steps(out) == [("a", 3)] and a.spec_token_ids == [1, 2]
    sched.update_from_output(out, {"a": [1, 2, 9]})
    assert a.num_computed_tokens == 5
    sched2, _ = make_sched(budget=100, max_model_len=9)
    b = decode_ready(sched2)                      # 7 known: positions 6..8 allowed
    b.spec_token_ids = [1, 2, 3, 4]
    out = sched2.schedule()
    assert steps(out) == [("a", 3)] and b.spec_token_ids == [1, 2]


def test_drafts_dropped_before_preempting():
    sched, bm = make_sched(num_blocks=3, budget=100)
    a = decode_ready(sched, prompt=range(6))      # 7 known, 6 computed: 2 blocks
    b = make_req("b", [50, 51])
    sched.add_request(b)
    run_step(sched)                               # b takes the last block
    a.spec_token_ids = [1, 2, 3]                  # positions 7..10 would need a 3rd block
    out = sched.schedule()
    assert out.preempted == [] and steps(out) == [("a", 1), ("b", 1)]
    assert a.spec_token_ids == []


def test_update_rejects_wrong_sample_counts():
    sched, _ = make_sched(budget=100)
    a = decode_ready(sched)
    a.spec_token_ids = [1]
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="expected 1..2 sampled tokens, got 3"):
        sched.update_from_output(out, {"a": [1, 2, 3]})
    sched2, _ = make_sched(budget=4)
    b = make_req("b", range(10))
    sched2.add_request(b)
    out = sched2.schedule()
    with pytest.raises(RuntimeError, match="partial prefill chunk"):
        sched2.update_from_output(out, {"b": [5]})


# -- input checks --------------------------------------------------------------------------
def test_add_request_rejects_what_can_never_run():
    sched, _ = make_sched(num_blocks=2, max_model_len=10)
    with pytest.raises(ValueError, match="context limit"):
        sched.add_request(make_req("long", range(11)))
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        sched.add_request(make_req("big", range(9)))
    ok = make_req("ok", range(3))
    sched.add_request(ok)
    run_step(sched)
    with pytest.raises(ValueError, match="only new requests"):
        sched.add_request(ok)


def test_finish_waiting_request_and_unfinished_flag():
    sched, _ = make_sched()
    a = make_req("a", range(3))
    sched.add_request(a)
    assert sched.has_unfinished_requests()
    sched.finish_request(a, FinishReason.ERROR)
    assert not sched.has_unfinished_requests() and a.finish_reason == FinishReason.ERROR


def test_no_torch_import():
    code = ("import sys; import llmbatch.runtime.block_manager, llmbatch.runtime.scheduler, "
            "llmbatch.runtime.planner; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
