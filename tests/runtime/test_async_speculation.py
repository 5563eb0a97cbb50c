"""Speculative decoding on an async engine (Engine.step): the steps that draft (a batch of at
most speculative_max_num_seqs) run synchronously, every other step asynchronously, and the
outputs are those of speculation off, token for token (greedy and seeded sampling), with the
n-gram proposer, a draft model and an installed proposer, through preemption and chunked
prefill. Before this, speculation made every step synchronous (W-SPEC at batch 64 ran at
0.75-0.79x the async engine on an H200, bench/RESULTS.md stop 13)."""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import EchoLast, make_prompts, make_target_and_draft

NUM_PROMPTS = 14


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_target_and_draft(tmp_path_factory)


def _params(sampled: bool) -> list[SamplingParams]:
    # Lengths spread out, so the batch shrinks through speculative_max_num_seqs as requests
    # finish: the engine switches from async steps to speculative ones mid-run.
    return [SamplingParams(max_new_tokens=4 + 3 * (i % 7), ignore_eos=True, seed=i,
                           temperature=0.8 if sampled else 0.0, top_k=5)
            for i in range(NUM_PROMPTS)]


class StepLog:
    """Wraps the runner: records, per launched step, whether it carried drafts, had a step in
    flight on the engine, and took inputs from the device (an async step overlapping)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[tuple[bool, bool, bool]] = []
        launch = engine.runner.launch

        def logged_launch(out, prev=None):
            drafts = any(item.request.spec_token_ids for item in out.scheduled)
            step = launch(out, prev)
            self.steps.append((drafts, engine._in_flight is not None,
                               bool(step.inputs.deferred_rows)))
            return step
        engine.runner.launch = logged_launch


def _prompts() -> list[list[int]]:
    return make_prompts(NUM_PROMPTS, seed=3)


def _run(models, *, sampled=False, proposer=None, params=None, prompts=None, **kw):
    target, _, tok = models
    engine = Engine(EngineConfig(model=str(target), device="cpu", dtype="float32", **kw),
                    tokenizer=tok)
    if proposer is not None:
        engine.set_proposer(proposer)
    log = StepLog(engine)
    prompts = prompts or _prompts()
    params = params or _params(sampled)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params[i]) for i, p in enumerate(prompts)])}
    assert sorted(results) == list(range(NUM_PROMPTS))
    assert all(r.error is None for r in results.values())
    outputs = [(results[i].output_token_ids, results[i].finish_reason)
               for i in range(NUM_PROMPTS)]
    return outputs, engine, log


def _assert_hybrid(engine: Engine, log: StepLog) -> None:
    """Both kinds of steps ran, a drafting step never overlapped one in flight, and every
    block came back."""
    assert engine.async_scheduling is True
    draft_steps = [s for s in log.steps if s[0]]
    assert draft_steps, "no step carried drafts"
    assert not any(in_flight for _, in_flight, _ in draft_steps)
    assert any(deferred for drafts, _, deferred in log.steps if not drafts), "no async overlap"
    assert engine._in_flight is None
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


SPEC = dict(speculative_method="ngram", num_speculative_tokens=3, speculative_max_num_seqs=4,
            max_num_seqs=8)
SETTINGS = {
    "ngram": dict(SPEC),
    "draft-model": dict(SPEC, speculative_method="draft"),
    "preemption": dict(SPEC, kv_cache_blocks=14, max_num_batched_tokens=64),
    "chunked-prefill": dict(SPEC, max_num_batched_tokens=24),
}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_async_engine_speculates_at_small_batches_losslessly(models, setting, sampled):
    kw = dict(SETTINGS[setting])
    if kw["speculative_method"] == "draft":
        kw["draft_model"] = str(models[1])
    want, _, _ = _run(models, sampled=sampled)
    got, engine, log = _run(models, sampled=sampled, async_scheduling=True, **kw)
    assert got == want
    _assert_hybrid(engine, log)
    if setting == "preemption":
        assert engine.stats()["num_preemptions"] > 0


class Oracle:
    """Proposes each request's true continuation (from a run without speculation): every
    draft is right, so acceptance shows the verify steps really ran."""

    def __init__(self, outputs) -> None:
        self.outputs = outputs

    def propose(self, request, k):
        done = request.num_output_tokens
        return self.outputs[request.request_id][0][done:done + k]


def test_installed_proposer_on_async_engine_is_used_and_lossless(models):
    """set_proposer on an async engine (the bench's W-SPEC replay on a default CUDA engine):
    it stays async for large batches and drafts at small ones. (was: refused when async was
    set explicitly, and auto async stepped back to synchronous for the whole run)"""
    want, _, _ = _run(models)
    got, engine, log = _run(models, proposer=Oracle(want), async_scheduling=True,
                            max_num_seqs=8, speculative_max_num_seqs=4)
    assert got == want
    _assert_hybrid(engine, log)
    assert engine.stats()["num_spec_accepted_tokens"] > 0


def test_batch_above_the_draft_limit_never_speculates(models):
    """max_num_seqs above speculative_max_num_seqs and more rows than fit one batch: drafts
    only once the queue is down to the last few requests; with a limit of 0 never, and every
    step but the first overlaps (no synchronous step at all)."""
    want, _, _ = _run(models)
    got, engine, log = _run(models, async_scheduling=True, speculative_method="ngram",
                            speculative_max_num_seqs=0, max_num_seqs=8)
    assert got == want
    assert not any(drafts for drafts, _, _ in log.steps)
    assert all(in_flight for _, in_flight, _ in log.steps[1:])
    assert engine.stats()["num_spec_accepted_tokens"] == 0


def test_max_num_seqs_within_the_draft_limit_speculates_from_the_first_decode(models):
    """max_num_seqs <= speculative_max_num_seqs: the batch can never outgrow the limit, so
    every step may draft (a long queue of waiting rows does not turn speculation off): no step
    overlaps."""
    want, _, _ = _run(models)
    got, engine, log = _run(models, async_scheduling=True, speculative_method="ngram",
                            num_speculative_tokens=3, speculative_max_num_seqs=4,
                            max_num_seqs=4)
    assert got == want
    assert not any(in_flight for _, in_flight, _ in log.steps)
    assert any(drafts for drafts, _, _ in log.steps)


def test_rows_added_mid_run_switch_a_drafting_engine_back_to_async(models):
    """Drafting steps on three requests under a short token budget: the third request gets
    drafts the step has no budget to schedule. Then ten more rows arrive, the batch outgrows
    the limit, and the async steps that follow must not meet those drafts (they do not verify
    drafts and would raise): a synchronous step on an async engine leaves none behind.
    Outputs equal speculation off."""
    params, prompts = _params(False), _prompts()
    for i in range(3):   # short prompts, long outputs: decoding together soon
        params[i] = SamplingParams(max_new_tokens=24, ignore_eos=True)
        prompts[i] = [7 + i, 8, 9]
    want, _, _ = _run(models, params=params, prompts=prompts)
    target, _, tok = models
    engine = Engine(EngineConfig(model=str(target), device="cpu", dtype="float32",
                                 async_scheduling=True, num_speculative_tokens=3,
                                 speculative_max_num_seqs=4, max_num_seqs=8,
                                 max_num_batched_tokens=8), tokenizer=tok)
    engine.set_proposer(EchoLast())
    log = StepLog(engine)
    reqs = list(engine._with_default_seeds(
        Request(i, p, params[i]) for i, p in enumerate(prompts)))
    results = []
    for req in reqs[:3]:
        assert engine._admit(req) is None
    running = engine.scheduler.running

    def all_decoding():
        return len(running) == 3 and all(
            r.num_computed_tokens == r.num_tokens - 1 for r in running)
    while not all_decoding():
        results += engine.step()
    # This step drafts 3 tokens for each: 1 + 3 tokens for the first two requests, no budget
    # left for the third, which keeps its drafts unless the engine drops them.
    results += engine.step()
    assert log.steps[-1][0] and len(running) == 3
    assert not any(r.spec_token_ids for r in running)
    for req in reqs[3:]:
        assert engine._admit(req) is None
    while engine.scheduler.has_unfinished_requests() or engine._in_flight is not None:
        results += engine.step()
    got = {r.request_id: (r.output_token_ids, r.finish_reason) for r in results}
    assert [got[i] for i in range(NUM_PROMPTS)] == want
    assert any(deferred for drafts, _, deferred in log.steps if not drafts)


def test_failed_drafting_step_leaves_no_drafts_for_the_async_steps_after_it(models):
    """A drafting (synchronous) step whose forward raises leaves the engine retryable, as the
    synchronous engine is: a later generate() with more rows (the batch now above the draft
    limit, so its steps run async) finishes every request with the tokens of a run without
    the failure. (defect: the failed step's drafts stayed on its requests, and the next async
    step scheduled them: 'async scheduling does not verify draft tokens', raised after the
    launch, with part of the step already committed.)"""
    prompts = _prompts()
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * NUM_PROMPTS
    want, _, _ = _run(models, params=params, prompts=prompts)
    target, _, tok = models
    engine = Engine(EngineConfig(model=str(target), device="cpu", dtype="float32",
                                 async_scheduling=True, num_speculative_tokens=3,
                                 speculative_max_num_seqs=4, max_num_seqs=8), tokenizer=tok)
    engine.set_proposer(EchoLast())
    forward = engine.runner.forward_step   # launch()'s forward (logits, graph greedy ids)
    failed = []

    def failing_once(s, prev_tokens=None):
        if not failed and any(r.spec_token_ids for r in s.sample_requests):
            failed.append(1)
            raise RuntimeError("injected device error")
        return forward(s, prev_tokens)
    engine.runner.forward_step = failing_once
    got = {}
    with pytest.raises(RuntimeError, match="injected"):
        for r in engine.generate(Request(i, prompts[i], params[i]) for i in range(3)):
            got[r.request_id] = (r.output_token_ids, r.finish_reason)
    assert failed
    for r in engine.generate(Request(i, prompts[i], params[i])
                             for i in range(3, NUM_PROMPTS)):
        got[r.request_id] = (r.output_token_ids, r.finish_reason)
    assert [got[i] for i in range(NUM_PROMPTS)] == want
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and engine._in_flight is None
