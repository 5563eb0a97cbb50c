"""Speculation on an async engine against the synchronous engine without it, every result
field compared (tokens, text, finish and stop reason, logprob ids, errors): stop ids and stop
strings that fire mid-generation (also inside a verified draft run), seeded sampling with
logprobs, max_new_tokens 1 and 2, a row that cannot run, several generate() calls on one
engine, and the proposer removed and installed again between results, so the engine switches
between async and drafting steps many times. The proposer knows the right continuation (from
the synchronous run) and spoils one draft in two for odd rows: whole runs of drafts are
accepted, a stop inside one trims it, and rejections happen too."""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import VOCAB, make_model, make_prompts

NUM_PROMPTS = 18
BAD_ROW = 7   # a prompt token outside the vocabulary: an error result, the others go on


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """(model dir, tokenizer, prompts, params). Stop ids and strings come from a first run
    without them, so that they fire after a few tokens."""
    path = tmp_path_factory.mktemp("mixed")
    make_model(path, arch="llama", seed=0)
    prompts = make_prompts(NUM_PROMPTS, seed=11)
    prompts[BAD_ROW] = prompts[BAD_ROW][:4] + [VOCAB + 3]
    base = _generate(_engine(path, tokenizer), prompts,
                     [SamplingParams(max_new_tokens=16, ignore_eos=True)] * NUM_PROMPTS)
    params = []
    for i in range(NUM_PROMPTS):
        out, kind = base[i], i % 6
        if kind == 0 or out.error is not None:
            p = SamplingParams(max_new_tokens=1 + i % 2)   # the prefill's token, or one more
        elif kind == 1:
            p = SamplingParams(max_new_tokens=16, stop_token_ids=[out.output_token_ids[3 + i % 5]])
        elif kind == 2:
            p = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=i, logprobs=2)
        elif kind == 3 and len(out.output_text) >= 10:
            p = SamplingParams(max_new_tokens=16, stop=[out.output_text[6:9]])
        elif kind == 4:
            p = SamplingParams(max_new_tokens=6 + i, ignore_eos=True, logprobs=0)
        else:   # unseeded sampling: default seeds follow input order, across generate() calls
            p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
        params.append(p)
    return path, tokenizer, prompts, params


def _engine(path, tokenizer, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", **kw),
                  tokenizer=tokenizer)


def _generate(engine, prompts, params, calls=1, on_result=None) -> dict:
    """Rows i, i + calls, i + 2 * calls, ... in the i-th generate() call."""
    results = {}
    for c in range(calls):
        for r in engine.generate(Request(i, prompts[i], params[i])
                                 for i in range(c, len(prompts), calls)):
            results[r.request_id] = r
            if on_result is not None:
                on_result()
    assert sorted(results) == list(range(len(prompts)))
    return results


class HalfOracle:
    """Drafts the true continuation; for odd rows the last of the k drafts is wrong."""

    def __init__(self, results) -> None:
        self.outputs = {i: r.output_token_ids for i, r in results.items()}

    def propose(self, request, k):
        done = request.num_output_tokens
        draft = list(self.outputs[request.request_id][done:done + k])
        if request.request_id % 2 and len(draft) == k:
            draft[-1] = (draft[-1] + 1) % VOCAB
        return draft


def _comparable(result):
    logprob_ids = None if result.logprobs is None else [
        (lp["token_id"], [t for t, _ in lp["top"]]) for lp in result.logprobs]
    return (result.output_token_ids, result.output_text, result.finish_reason,
            result.stop_reason, logprob_ids, result.error)


@pytest.mark.parametrize("engine_kw", [
    dict(),
    dict(kv_cache_blocks=14, max_num_batched_tokens=32, block_size=8),
], ids=["default", "tight-pool-chunked"])
def test_switching_engine_equals_sync_without_speculation(setup, engine_kw):
    path, tokenizer, prompts, params = setup
    sync = _engine(path, tokenizer, **engine_kw)
    want = _generate(sync, prompts, params, calls=3)
    engine = _engine(path, tokenizer, async_scheduling=True, num_speculative_tokens=3,
                     speculative_max_num_seqs=3, max_num_seqs=6, **engine_kw)
    proposer = HalfOracle(want)
    engine.set_proposer(proposer)
    steps = []   # per launch: (carried drafts, a step was in flight)
    launch = engine.runner.launch

    def logged_launch(out, prev=None):
        steps.append((any(item.request.spec_token_ids for item in out.scheduled),
                      engine._in_flight is not None))
        return launch(out, prev)
    engine.runner.launch = logged_launch
    results = []

    def toggle():   # every second result: off, then on again two results later
        results.append(1)
        if len(results) % 2 == 0:
            engine.set_proposer(None if engine.proposer is not None else proposer)
    got = _generate(engine, prompts, params, calls=3, on_result=toggle)
    diff = [i for i in range(NUM_PROMPTS) if _comparable(got[i]) != _comparable(want[i])]
    assert not diff, f"row {diff[0]}: {_comparable(got[diff[0]])} != {_comparable(want[diff[0]])}"
    assert got[BAD_ROW].error and "outside the vocabulary" in got[BAD_ROW].error
    assert any(drafts for drafts, _ in steps), "no step drafted"
    assert any(in_flight for _, in_flight in steps), "no step overlapped"
    assert not any(in_flight for drafts, in_flight in steps if drafts)
    stats, sync_stats = engine.stats(), sync.stats()
    assert stats["num_output_tokens"] == sync_stats["num_output_tokens"]
    assert stats["num_spec_accepted_tokens"] > 0
    assert stats["num_error_requests"] == sync_stats["num_error_requests"] == 1
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_cnt == 0 for b in bm.blocks)
    assert engine._in_flight is None
    assert not engine.scheduler.running and not engine.scheduler.waiting
