"""Review findings on the runtime core: each test pins one edge case (see the review report).

Tests marked "defect" fail on the code as reviewed; the others guard edge cases that work.
"""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import generate, make_prompts, new_engine


class _OracleProposer:
    """Proposes the true continuation (from a run without speculation): every draft is accepted."""

    def __init__(self, future: list[int]) -> None:
        self.future = future

    def propose(self, req, num_tokens):
        n = req.num_output_tokens
        return self.future[n:n + num_tokens]


def _stop_inside_accepted_drafts(llama_setup, **params):
    """A stop token that arrives as an accepted draft, with more accepted tokens after it."""
    prompt = make_prompts(1, seed=11)[0]
    free = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, **params))])[0].output_token_ids
    # Step 1 samples output 0; step 2 verifies drafts 1..4 and returns outputs 1..5, so a stop
    # at output index 2 leaves outputs 3..5 to be dropped by stop_rules.apply_stop_rules.
    stop_at = free[2]
    assert stop_at not in free[:2]
    engine = new_engine(llama_setup, speculative_method="ngram", num_speculative_tokens=4)
    engine.set_proposer(_OracleProposer(free))
    got = generate(engine, [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at], **params))])[0]
    assert got.output_token_ids == free[:3] and got.finish_reason == "stop"
    return got, engine


def test_logprobs_trimmed_with_tokens_dropped_after_a_stop(llama_setup):
    # defect: engine.py _check_stop (now stop_rules.apply_stop_rules) drops tokens after the stop but not req.output_logprobs.
    got, _ = _stop_inside_accepted_drafts(llama_setup, logprobs=1)
    assert len(got.logprobs) == got.num_output_tokens == 3


def test_spec_accepted_count_excludes_tokens_dropped_after_a_stop(llama_setup):
    # defect: the scheduler counts 4 accepted drafts; only drafts 1 and 2 are kept.
    got, engine = _stop_inside_accepted_drafts(llama_setup)
    assert got.spec_accepted_tokens == 2
    assert engine.stats()["num_spec_accepted_tokens"] == 2


def test_duplicate_request_ids_give_a_clear_error_or_correct_results(llama_setup):
    # defect: the runner's sampled dict is keyed by request_id, so two running requests with
    # one id get each other's tokens; update_from_output raises an internal error mid-run.
    prompts = make_prompts(2, seed=12)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    alone = [generate(new_engine(llama_setup), [Request("a", p, params)])["a"].output_token_ids
             for p in prompts]
    engine = new_engine(llama_setup, ordering="input")
    try:
        results = list(engine.generate([Request("dup", p, params) for p in prompts]))
    except ValueError as exc:   # a clear, up-front rejection is fine too
        assert "dup" in str(exc) and "duplicate" in str(exc).lower()
        return
    ok = sorted(r.output_token_ids for r in results if r.error is None)
    errors = [r for r in results if r.error is not None]
    assert len(results) == 2
    assert all("duplicate" in r.error.lower() for r in errors)
    assert all(t in alone for t in ok)


def test_request_that_outgrows_the_kv_pool_does_not_kill_the_batch(llama_setup):
    # defect: check_request only sizes the prompt; a 20-token prompt generating 20 tokens needs
    # 3 blocks of 16 in a 2-block pool, so after preempting itself the scheduler raises
    # "does not fit in the KV pool even alone" and every other request of the run is lost.
    engine = new_engine(llama_setup, kv_cache_blocks=2, block_size=16)
    reqs = [Request("big", [7] * 20, SamplingParams(max_new_tokens=20, ignore_eos=True)),
            Request("small", [9] * 5, SamplingParams(max_new_tokens=3, ignore_eos=True))]
    res = generate(engine, reqs)
    assert res["small"].num_output_tokens == 3 and res["small"].error is None
    assert res["big"].finish_reason in ("error", "length")
    if res["big"].finish_reason == "error":
        assert "KV" in res["big"].error


def test_rejected_requests_stream_instead_of_piling_up(llama_setup):
    # defect: generate() refills until num_waiting reaches refill_to, and rejected requests
    # never enter the waiting queue, so a long run of rejects is pulled (and held) whole.
    engine = new_engine(llama_setup, max_model_len=16, planner_window=4)
    pulled = 0

    def rows():
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield Request(i, [5] * 16, SamplingParams(max_new_tokens=2))

    first = next(iter(engine.generate(rows())))
    assert first.finish_reason == "error"
    assert pulled <= 64 + 4


def test_eos_as_first_token_finishes_with_empty_text(llama_setup):
    # guard: EOS as the very first output token.
    prompt = make_prompts(1, seed=13)[0]
    first = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=4, ignore_eos=True))])[0].output_token_ids[0]
    engine = new_engine(llama_setup)
    engine.eos_token_ids = {first}
    got = generate(engine, [Request(0, prompt, SamplingParams(max_new_tokens=4))])[0]
    assert got.output_token_ids == [first] and got.finish_reason == "stop"
    assert got.stop_reason == first


def test_prompt_at_context_limit_minus_one_with_speculation(llama_setup):
    # guard: prompt of max_model_len - 1 tokens yields exactly one token, drafts or not.
    engine = new_engine(llama_setup, max_model_len=32, speculative_method="ngram")
    got = generate(engine, [Request(0, [5, 6] * 15 + [5], SamplingParams(
        max_new_tokens=8, ignore_eos=True))])[0]
    assert got.num_output_tokens == 1 and got.finish_reason == "length"
    assert engine.stats()["num_spec_accepted_tokens"] == 0


def test_max_new_tokens_one_under_preemption_and_prefix_cache(llama_setup):
    # guard: max_new_tokens=1 with a tight pool, shared prefixes and speculation on.
    prompts = make_prompts(12, seed=14)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    ref = generate(new_engine(llama_setup), [Request(i, p, params) for i, p in enumerate(prompts)])
    engine = new_engine(llama_setup, kv_cache_blocks=8, speculative_method="ngram")
    got = generate(engine, [Request(i, p, params) for i, p in enumerate(prompts)])
    assert sorted(got) == list(range(12))
    assert all(got[i].output_token_ids == ref[i].output_token_ids for i in range(12))


@pytest.mark.parametrize("bad", [384, 10**6, -1])
def test_token_id_outside_the_vocabulary_is_an_error_result(llama_setup, bad):
    # defect: nothing checks prompt ids against the vocabulary: the embedding lookup raises
    # mid-step (on CUDA a device-side assert that poisons the context) and the run is lost.
    engine = new_engine(llama_setup)
    res = generate(engine, [Request("bad", [5, bad, 6], SamplingParams(max_new_tokens=2)),
                            Request("ok", [5, 6, 7], SamplingParams(max_new_tokens=2))])
    assert res["bad"].finish_reason == "error" and "vocab" in res["bad"].error
    assert res["ok"].error is None and res["ok"].num_output_tokens >= 1


@pytest.mark.parametrize("kw", [
    dict(kv_cache_blocks=7, max_num_batched_tokens=24, planner_window=5),
    dict(kv_cache_blocks=9, max_num_seqs=3, speculative_method="ngram",
         speculative_max_num_seqs=64, planner_window=7),
    dict(kv_cache_blocks=14, block_size=8, max_num_batched_tokens=20,
         speculative_method="ngram", speculative_max_num_seqs=64),
])
def test_tight_pool_chunking_leaders_and_drafts_match_a_roomy_run(llama_setup, kw):
    # guard: preemption while prefix leaders run, chunked prefill, drafts, window boundaries.
    prompts = make_prompts(20, seed=15, num_prefixes=2)
    prompts += [p[:] for p in prompts[:4]]          # exact duplicates: leader == whole prompt
    params = [SamplingParams(max_new_tokens=6 + i % 5, temperature=0.7 * (i % 2), seed=i,
                             ignore_eos=True) for i in range(len(prompts))]
    ref = generate(new_engine(llama_setup), [Request(i, p, params[i]) for i, p in enumerate(prompts)])
    engine = new_engine(llama_setup, **kw)
    got = generate(engine, [Request(i, p, params[i]) for i, p in enumerate(prompts)])
    assert sorted(got) == list(range(len(prompts)))
    assert all(r.error is None for r in got.values())
    for i in range(len(prompts)):
        assert got[i].output_token_ids == ref[i].output_token_ids, i
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_output_tokens"] == sum(r.num_output_tokens for r in got.values())
    assert stats["num_cached_prompt_tokens"] == sum(r.num_cached_prompt_tokens
                                                    for r in got.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("kw", [dict(), dict(kv_cache_blocks=10, max_num_batched_tokens=32)])
def test_target_as_its_own_draft_gets_every_draft_accepted(llama_setup, kw, monkeypatch):
    # guard: with draft == target (greedy), a rejected draft can only come from stale draft
    # K/V (preemption, prefix-cache hits, chunked prefill, skipped drafting steps).
    import llmbatch.runtime.launched_step as ls   # collect_sampled counts accepted drafts

    calls = []
    real = ls.num_accepted

    def spy(draft, sampled):
        n = real(draft, sampled)
        calls.append((n, len(draft)))
        return n

    monkeypatch.setattr(ls, "num_accepted", spy)
    path, _ = llama_setup
    prompts = make_prompts(16, seed=16)
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    engine = new_engine(llama_setup, speculative_method="draft", draft_model=str(path),
                        num_speculative_tokens=3, speculative_max_num_seqs=64, **kw)
    got = generate(engine, [Request(i, p, params) for i, p in enumerate(prompts)])
    assert all(r.num_output_tokens == 9 for r in got.values())
    assert calls and all(n == k for n, k in calls)
    if kw:
        assert engine.stats()["num_preemptions"] > 0


def test_stop_string_spanning_two_tokens_inside_accepted_drafts(llama_setup):
    # guard: a stop string made of the last char of one token and the first of the next,
    # arriving in one verification step, cuts both the text and the tokens after it.
    _, tok = llama_setup
    prompt = make_prompts(1, seed=17)[0]
    free = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True))])[0]
    text, out = free.output_text, free.output_token_ids
    offs = [len(tok.decode(out[:j], skip_special_tokens=True)) for j in range(len(out) + 1)]
    stable = [text.startswith(tok.decode(out[:j], skip_special_tokens=True))
              for j in range(len(out) + 1)]
    cands = [j for j in range(2, len(out) - 1)
             if stable[j] and stable[j + 1] and offs[j] > offs[j - 1] and offs[j + 1] > offs[j]
             and text.find(text[offs[j] - 1:offs[j] + 1]) == offs[j] - 1]
    assert cands
    j = cands[0]
    stop = text[offs[j] - 1:offs[j] + 1]
    engine = new_engine(llama_setup, speculative_method="ngram", num_speculative_tokens=4)
    engine.set_proposer(_OracleProposer(out))
    got = generate(engine, [Request(0, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True, stop=[stop]))])[0]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert got.output_text == text[:offs[j] - 1]
    assert got.output_token_ids == out[:j + 1]


def test_logprobs_above_the_vocabulary_is_an_error_result(llama_setup):
    # defect: the sampler raises mid-step, the whole batch is lost and the engine keeps the
    # request running (a second generate() call fails on it again).
    engine = new_engine(llama_setup)
    res = generate(engine, [Request("bad", [5, 6, 7], SamplingParams(max_new_tokens=2,
                                                                      logprobs=1000)),
                            Request("ok", [5, 6, 8], SamplingParams(max_new_tokens=2))])
    assert res["bad"].finish_reason == "error" and "vocab" in res["bad"].error
    assert res["ok"].error is None
    assert not engine.scheduler.has_unfinished_requests()


def test_earlier_requests_drafts_dropped_before_preempting_a_later_one():
    # defect (docs/runtime.md: "a preempting step first drops running requests' draft
    # tokens"): scheduler.py only drops the drafts of the request being allocated, so an
    # earlier request's optional drafts take the last block and a later decode is preempted.
    from llmbatch.runtime.block_manager import BlockManager
    from llmbatch.runtime.scheduler import Scheduler

    cfg = EngineConfig(model="unused", block_size=4, max_num_batched_tokens=100, max_num_seqs=8)
    bm = BlockManager(5, 4, True)
    sched = Scheduler(cfg, bm)
    a = Request("a", list(range(10, 16)), SamplingParams(max_new_tokens=50))
    b = Request("b", list(range(50, 58)), SamplingParams(max_new_tokens=50))
    for r in (a, b):
        sched.add_request(r)
    out = sched.schedule()                        # a: 6 tokens (2 blocks), b: 8 (2 blocks)
    sched.update_from_output(out, {"a": [7], "b": [7]})
    assert bm.num_free_blocks == 1
    a.spec_token_ids = [1, 2]                     # positions 6..8: would need a 3rd block
    out = sched.schedule()                        # b's decode (position 8) needs one too
    assert out.preempted == []
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1),
                                                                                ("b", 1)]


def test_empty_input_and_all_rejected_input(llama_setup):
    # guard: no requests at all, and only requests that can never run.
    engine = new_engine(llama_setup, max_model_len=16)
    assert list(engine.generate([])) == []
    assert engine.stats()["num_requests"] == 0 and engine.stats()["num_steps"] == 0
    res = generate(engine, [Request(i, [5] * (16 + i), SamplingParams(max_new_tokens=2))
                            for i in range(5)])
    assert sorted(res) == list(range(5))
    assert all(r.finish_reason == "error" and r.output_token_ids == [] for r in res.values())
    stats = engine.stats()
    assert stats["num_error_requests"] == 5 and stats["num_prompt_tokens"] == 0
    assert stats["num_steps"] == 0
