"""Async scheduling (EngineConfig.async_scheduling, docs/async_scheduling.md) must change
nothing but timing: every result field equals the synchronous engine's, for greedy, seeded
sampling, logprobs, stop ids, stop strings, max_new_tokens and the context limit, with the
prefix cache, chunked prefill and preemption; every KV block comes back."""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import EchoLast, make_model, make_prompts

NUM_PROMPTS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """(model dir, tokenizer, prompts, params per prompt). The stop ids and strings are taken
    from a first synchronous run, so that they really fire mid-generation."""
    path = tmp_path_factory.mktemp("async")
    make_model(path, arch="llama", num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=2)
    prompts = make_prompts(NUM_PROMPTS, seed=7)
    base = _run(path, tokenizer, prompts,
                [SamplingParams(max_new_tokens=12, ignore_eos=True)] * NUM_PROMPTS, {})[0]
    params = []
    for i in range(NUM_PROMPTS):
        out = base[i]
        kind = i % 5
        if kind == 0:
            p = SamplingParams(max_new_tokens=3 + i % 9)
        elif kind == 1:   # a stop id that first appears after a few tokens
            p = SamplingParams(max_new_tokens=12, stop_token_ids=[out.output_token_ids[2 + i % 6]])
        elif kind == 2:
            p = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=i, logprobs=2)
        elif kind == 3 and len(out.output_text) >= 6:
            p = SamplingParams(max_new_tokens=12, stop=[out.output_text[3:6]])
        else:   # unseeded sampling: the engine's default seeds (from input order)
            p = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20)
        params.append(p)
    return path, tokenizer, prompts, params


def _run(path, tokenizer, prompts, params, engine_kwargs, wrap_launch=False):
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", **engine_kwargs)
    engine = Engine(config, tokenizer=tokenizer)
    deferred_steps = []
    if wrap_launch:
        launch = engine.runner.launch

        def counting_launch(out, prev=None):
            step = launch(out, prev)
            deferred_steps.append((step.inputs.deferred_rows, step.inputs.deferred_src))
            return step
        engine.runner.launch = counting_launch
    reqs = [Request(i, p, params[i]) for i, p in enumerate(prompts)]
    results = {r.request_id: r for r in engine.generate(reqs)}
    assert sorted(results) == list(range(len(prompts)))
    return results, engine, deferred_steps


def _is_run(values) -> bool:
    return values == list(range(values[0], values[0] + len(values)))


def _comparable(result):
    """Every result field that must match exactly (logprob values are compared apart)."""
    logprob_ids = None if result.logprobs is None else [
        (lp["token_id"], [t for t, _ in lp["top"]]) for lp in result.logprobs]
    return (result.output_token_ids, result.output_text, result.finish_reason,
            result.stop_reason, logprob_ids, result.error)


def _logprob_values(result) -> list[float]:
    return [] if result.logprobs is None else [
        v for lp in result.logprobs for v in [lp["logprob"]] + [v for _, v in lp["top"]]]


SETTINGS = {
    "default": dict(),
    "no-prefix-cache": dict(prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=24),
    "preemption": dict(kv_cache_blocks=12, max_num_batched_tokens=64),
    "context-limit": dict(max_model_len=60),
    "batch-4": dict(max_num_seqs=4),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_async_results_equal_sync(setup, setting):
    path, tokenizer, prompts, params = setup
    kwargs = SETTINGS[setting]
    want, sync_engine, _ = _run(path, tokenizer, prompts, params, kwargs)
    got, engine, deferred_steps = _run(path, tokenizer, prompts, params,
                                       dict(kwargs, async_scheduling=True), wrap_launch=True)
    diff = [i for i in range(NUM_PROMPTS) if _comparable(got[i]) != _comparable(want[i])]
    assert not diff, (f"{len(diff)} rows differ; first {diff[0]}: {_comparable(got[diff[0]])} "
                      f"!= {_comparable(want[diff[0]])}")
    for i in range(NUM_PROMPTS):
        # The two engines batch rows differently, so float32 sums differ in the last bits.
        assert _logprob_values(got[i]) == pytest.approx(_logprob_values(want[i]), abs=1e-4)
        if params[i].logprobs is not None and got[i].error is None:   # one per kept token
            assert len(got[i].logprobs) == got[i].num_output_tokens
    # The overlap really happened: most steps took decode inputs straight from the device,
    # both as one contiguous run (the slice copy of deferred_tokens.py) and in other patterns
    # (the index lists: a request admitted or stopped between the two steps).
    assert sum(1 for rows, _ in deferred_steps if rows) > len(deferred_steps) // 2
    runs = [_is_run(rows) and _is_run(src) for rows, src in deferred_steps if rows]
    assert any(runs) and not all(runs), runs
    stats, sync_stats = engine.stats(), sync_engine.stats()
    assert stats["async_scheduling"] is True and sync_stats["async_scheduling"] is False
    assert stats["num_output_tokens"] == sync_stats["num_output_tokens"]
    if setting != "preemption":
        # Same prefix hits, row by row. Under a pool this tight they may differ: step n+1 is
        # planned before step n's finished requests return their blocks, which changes what
        # gets evicted (the outputs may not, and do not).
        assert ([got[i].num_cached_prompt_tokens for i in range(NUM_PROMPTS)]
                == [want[i].num_cached_prompt_tokens for i in range(NUM_PROMPTS)])
    # Requests that stopped on a token found one step late had their next token dropped.
    assert stats["num_async_dropped_tokens"] > 0
    assert sync_stats["num_async_dropped_tokens"] == 0
    if setting == "preemption":
        assert stats["num_preemptions"] > 0
    if setting == "default":
        assert stats["num_cached_prompt_tokens"] > 0
    # Every block is back: none held, free list complete.
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_cnt == 0 for block in bm.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine._in_flight is None


def test_async_scheduling_config_is_validated():
    # With speculation, the drafting steps run synchronously (tests/runtime/
    # test_async_speculation.py): the pair is valid.
    EngineConfig(model="m", async_scheduling=True, speculative_method="ngram")
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        EngineConfig(model="m", async_scheduling=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="true, false or null"):
        EngineConfig(model="m", async_scheduling="yes")


def test_auto_async_scheduling_is_on_exactly_where_supported():
    """None (the default): on for a CUDA runner with launch(), tp 1 (measured 1.34x W-RANDOM
    on an H200), speculation or not; an explicit setting wins where it is valid."""
    auto = EngineConfig(model="m")
    assert auto.async_scheduling is None
    assert auto.async_scheduling_on("cuda", True) is True
    assert auto.async_scheduling_on("cpu", True) is False
    assert auto.async_scheduling_on("cuda", False) is False      # e.g. the TP executor
    assert EngineConfig(model="m", speculative_method="ngram").async_scheduling_on(
        "cuda", True) is True
    assert EngineConfig(model="m", tensor_parallel_size=2).async_scheduling_on(
        "cuda", True) is False
    assert EngineConfig(model="m", async_scheduling=False).async_scheduling_on(
        "cuda", True) is False
    assert EngineConfig(model="m", async_scheduling=True).async_scheduling_on(
        "cpu", True) is True


def test_async_step_survives_a_failed_launch_like_sync(setup):
    """A launch that raises (e.g. a device error in the forward) must leave the step in flight
    collectable, as the synchronous engine leaves its state: a later generate() finishes every
    request with the tokens of a run without the failure. (defect: _step_async dropped the
    in-flight step before launching, so its pending tokens could never be read again.)"""
    path, tokenizer, prompts, _ = setup
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True)] * 6
    want = {r.request_id: r.output_token_ids
            for r in _run(path, tokenizer, prompts[:6], params, {})[0].values()}
    for async_scheduling in (False, True):
        engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                     async_scheduling=async_scheduling), tokenizer=tokenizer)
        forward = engine.runner.forward_step   # launch()'s forward (logits, graph greedy ids)
        calls = []

        def failing_once(s, prev_tokens=None):
            calls.append(1)
            if len(calls) == 3:   # the third step: two steps committed before it
                raise RuntimeError("injected device error")
            return forward(s, prev_tokens)
        engine.runner.forward_step = failing_once
        reqs = [Request(i, p, params[i]) for i, p in enumerate(prompts[:6])]
        got = {}
        with pytest.raises(RuntimeError, match="injected"):
            for r in engine.generate(reqs):
                got[r.request_id] = r.output_token_ids
        got.update({r.request_id: r.output_token_ids for r in engine.generate([])})
        assert got == want, f"async_scheduling={async_scheduling}"
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and engine._in_flight is None


def test_auto_async_engine_keeps_async_with_an_installed_proposer(setup, monkeypatch):
    """Auto async scheduling (None; on for CUDA, here forced on) with a proposer installed
    (the bench's W-SPEC replay on a default engine): the engine stays async, drafts at this
    small batch (its steps synchronous) and gives the synchronous engine's outputs; removing
    the proposer changes nothing but the drafting. (was: the proposer made the whole engine
    synchronous; tests/runtime/test_async_speculation.py has the mixed runs)"""
    path, tokenizer, prompts, _ = setup
    monkeypatch.setattr(EngineConfig, "async_scheduling_on", lambda self, *a: True)
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"),
                    tokenizer=tokenizer)
    assert engine.async_scheduling is True

    def run(eng):
        reqs = [Request(f"r{i}", p, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                   ignore_eos=True))
                for i, p in enumerate(prompts[:4])]
        return {r.request_id: r.output_token_ids for r in eng.generate(reqs)}

    engine.set_proposer(EchoLast())
    assert engine.async_scheduling is True
    with_proposer = run(engine)
    accepted = engine.stats()["num_spec_accepted_tokens"]
    assert accepted > 0   # the proposer was used
    engine.set_proposer(None)
    without = run(engine)
    assert engine.stats()["num_spec_accepted_tokens"] == accepted
    assert engine.async_scheduling is True
    monkeypatch.undo()
    sync = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"),
                  tokenizer=tokenizer)
    assert sync.async_scheduling is False
    want = run(sync)
    assert with_proposer == want
    assert without == {f"r{i}": want[f"r{i}"] for i in range(4)}


def test_proposer_removed_mid_generation_leaves_no_drafts_for_async_steps(setup, monkeypatch):
    """set_proposer(None) while requests run (auto async, forced on): the drafts the last
    synchronous step gave running requests are dropped, so the async steps that follow never
    see spec_token_ids (they do not verify drafts and would raise); the run completes with the
    synchronous engine's outputs. (defect, found in review: stale drafts stayed on requests.)"""
    path, tokenizer, prompts, _ = setup
    monkeypatch.setattr(EngineConfig, "async_scheduling_on", lambda self, *a: True)
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                 max_num_batched_tokens=64), tokenizer=tokenizer)

    def requests():
        return [Request(f"r{i}", p, SamplingParams(max_new_tokens=6 + 3 * i, temperature=0.0,
                                                   ignore_eos=True))
                for i, p in enumerate(prompts[:6])]

    engine.set_proposer(EchoLast())
    gen = engine.generate(requests())
    got = {}
    first = next(gen)                       # a few synchronous steps with drafts
    got[first.request_id] = first.output_token_ids
    # Drafts handed out for a step that then did not schedule their requests (a short token
    # budget): the state a removal can meet.
    engine._propose()
    assert any(r.spec_token_ids for r in engine.scheduler.running)
    engine.set_proposer(None)
    assert engine.async_scheduling is True
    assert all(not r.spec_token_ids for r in engine.scheduler.running)
    got.update({r.request_id: r.output_token_ids for r in gen})
    monkeypatch.undo()
    sync = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"),
                  tokenizer=tokenizer)
    assert got == {r.request_id: r.output_token_ids for r in sync.generate(requests())}
