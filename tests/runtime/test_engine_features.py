"""Engine behaviour beyond greedy equality: seeded sampling independent of batch composition,
stop strings / stop token ids / ignore_eos, and requests that can never run."""

from __future__ import annotations

import random

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import VOCAB, generate, make_prompts, new_engine


def sampled(i, seed):
    return SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=seed,
                          ignore_eos=True)


def test_seeded_sampling_is_independent_of_batch_and_order(llama_setup):
    prompts = make_prompts(64, seed=3)
    alone = generate(new_engine(llama_setup), [Request("x", prompts[7], sampled(7, 1234))])["x"]
    batch = [Request(i, p, sampled(i, 1000 + i)) for i, p in enumerate(prompts)]
    batch[7] = Request(7, prompts[7], sampled(7, 1234))
    in_batch = generate(new_engine(llama_setup), batch)
    order = list(range(64))
    random.Random(1).shuffle(order)
    shuffled = generate(new_engine(llama_setup, ordering="input", max_num_seqs=7),
                        [Request(i, prompts[i], sampled(i, 1234 if i == 7 else 1000 + i))
                         for i in order])
    assert in_batch[7].output_token_ids == alone.output_token_ids
    assert all(shuffled[i].output_token_ids == in_batch[i].output_token_ids for i in range(64))
    # Sampling really samples: different seeds give different continuations somewhere.
    distinct = {tuple(r.output_token_ids) for r in in_batch.values()}
    assert len(distinct) > 32
    other_seed = generate(new_engine(llama_setup), [Request("x", prompts[7], sampled(7, 99))])["x"]
    assert other_seed.output_token_ids != alone.output_token_ids


def test_stop_token_ids_and_max_new_tokens(llama_setup):
    engine = new_engine(llama_setup)
    prompt = make_prompts(1, seed=5)[0]
    free = generate(engine, [Request(0, prompt, SamplingParams(max_new_tokens=12,
                                                               ignore_eos=True))])[0]
    assert free.finish_reason == "length" and free.num_output_tokens == 12
    stop_at = free.output_token_ids[4]
    first = free.output_token_ids.index(stop_at)
    stopped = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]))])[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    assert stopped.output_token_ids == free.output_token_ids[:first + 1]


def test_stop_string_truncates_text(llama_setup):
    path, tok = llama_setup
    prompt = make_prompts(1, seed=6)[0]
    free = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True))])[0]
    text = free.output_text
    assert len(text) > 4
    stop = text[3:5]
    cut = text.index(stop)
    got = generate(new_engine(llama_setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True, stop=[stop]))])[0]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert got.output_text == text[:cut]
    assert got.output_token_ids == free.output_token_ids[:got.num_output_tokens]
    assert got.num_output_tokens < 16


def test_too_long_prompt_is_an_error_result_not_a_crash(llama_setup):
    engine = new_engine(llama_setup, max_model_len=64)
    reqs = [Request("long", [5] * 64, SamplingParams(max_new_tokens=4)),
            Request("ok", [5] * 10, SamplingParams(max_new_tokens=4))]
    res = generate(engine, reqs)
    assert res["long"].finish_reason == "error" and "context" in res["long"].error
    assert res["ok"].finish_reason in ("stop", "length") and res["ok"].error is None
    assert engine.stats()["num_error_requests"] == 1


def test_generation_stops_at_the_context_limit(llama_setup):
    engine = new_engine(llama_setup, max_model_len=40)
    res = generate(engine, [Request(0, [7] * 30, SamplingParams(max_new_tokens=100,
                                                                ignore_eos=True))])[0]
    assert res.finish_reason == "length"
    assert res.num_prompt_tokens + res.num_output_tokens == 40


def test_timings_and_counters(llama_setup):
    engine = new_engine(llama_setup)
    prompts = make_prompts(8, seed=9)
    res = generate(engine, [Request(i, p, SamplingParams(max_new_tokens=5, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    for r in res.values():
        assert r.ttft_s is not None and r.ttft_s >= 0
        assert r.latency_s >= r.ttft_s and r.tpot_s is not None and r.tpot_s >= 0
    stats = engine.stats()
    assert stats["num_output_tokens"] == 40
    assert stats["num_prompt_tokens"] == sum(len(p) for p in prompts)
    assert all(0 <= t < VOCAB for r in res.values() for t in r.output_token_ids)


def test_ngram_speculation_is_lossless_for_sampling_and_under_preemption(llama_setup):
    # Repetitive prompts so prompt lookup has something to propose.
    rng = random.Random(4)
    prompts = []
    for i in range(24):
        motif = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))]
        prompts.append(motif * rng.randint(3, 8))

    def run(**kw):
        engine = new_engine(llama_setup, **kw)
        reqs = [Request(i, p, SamplingParams(max_new_tokens=12, temperature=0.5, top_k=3, seed=i,
                                             ignore_eos=True, logprobs=2))
                for i, p in enumerate(prompts)]
        return generate(engine, reqs), engine.stats()

    off, _ = run()
    on, stats = run(speculative_method="ngram", num_speculative_tokens=4,
                    speculative_max_num_seqs=64)
    tight, tight_stats = run(speculative_method="ngram", num_speculative_tokens=4,
                             speculative_max_num_seqs=64, kv_cache_blocks=6)
    assert stats["num_spec_accepted_tokens"] > 0
    assert tight_stats["num_preemptions"] > 0
    for i in range(len(prompts)):
        assert on[i].output_token_ids == off[i].output_token_ids
        assert tight[i].output_token_ids == off[i].output_token_ids
        # One logprob entry per kept token, none for rejected drafts.
        assert len(on[i].logprobs) == on[i].num_output_tokens
        # Every step emits at least one token of the target's own, so drafts are fewer.
        assert on[i].spec_accepted_tokens < on[i].num_output_tokens
    assert sum(r.spec_accepted_tokens for r in on.values()) == stats["num_spec_accepted_tokens"]


def test_speculation_turns_off_for_large_batches(llama_setup):
    prompts = [[5, 6, 7] * 6 for _ in range(8)]
    engine = new_engine(llama_setup, speculative_method="ngram", speculative_max_num_seqs=4)
    generate(engine, [Request(i, p, SamplingParams(max_new_tokens=4, ignore_eos=True))
                      for i, p in enumerate(prompts)])
    assert engine.stats()["num_spec_accepted_tokens"] == 0


def test_ttft_and_latency_leave_out_time_queued_before_the_first_step(llama_setup, monkeypatch):
    # One sequence at a time: request 2 waits in the queue for the whole of requests 0 and 1.
    # From add_request its TTFT would exceed request 0's latency; from its first scheduled
    # step it is one prefill, like request 0's.
    # A clock that ticks once per reading: the comparisons below count engine work, not wall
    # time, so a loaded machine cannot flip them (they failed once under parallel test load).
    import itertools
    import time

    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    engine = new_engine(llama_setup, max_num_seqs=1, ordering="input")
    prompts = make_prompts(3, seed=11)
    res = generate(engine, [Request(i, p, SamplingParams(max_new_tokens=16, ignore_eos=True))
                            for i, p in enumerate(prompts)])
    assert res[2].ttft_s < 0.5 * res[0].latency_s
    assert res[2].latency_s < 0.8 * (res[0].latency_s + res[1].latency_s)
    for r in res.values():
        assert 0 <= r.ttft_s <= r.latency_s
