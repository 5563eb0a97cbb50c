"""Drafts padded to k where the runner has k + 1-token verify CUDA graphs (engine_speculation).

A verify step replays a CUDA graph only when every span has exactly k + 1 tokens
(cuda_graphs.graph_key_for); one with fewer drafts for some request ran eagerly, ~16 ms a step
at batch 1 on an H200 against ~1.4 ms for a graphed verify step (W-SPEC stop 19: the replay
proposer's last steps before max_new_tokens, 2 such steps were 15 % of alpha=0.6's b=1 wall;
at b=8, 12 eager steps were 47 % of it). The engine now tops short draft lists up to k
(filler tokens: verification stays lossless, tokens past max_new_tokens are trimmed by the
stop rules), so those steps replay the graph. On CPU there are no graphs: the test stands in
for them by making the engine believe it has them, and checks spans and outputs."""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import make_prompts, make_target_and_draft

K = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_target_and_draft(tmp_path_factory)


@pytest.fixture(scope="module")
def spec_off(models):
    return _run(models, None, graphs=False)[0]


class ShortDrafts:
    """Drafts 0..k-1 tokens (the last token repeated), varying with the output length: spans
    of a batch would differ, and batch 1 would get short verify spans."""

    def propose(self, request, k):
        n = len(request.output_token_ids) % k
        return [request.all_token_ids[-1]] * min(n, k)


def _run(models, proposer, graphs: bool, num: int = 3):
    target, _, tok = models
    engine = Engine(EngineConfig(model=str(target), device="cpu", dtype="float32",
                                 num_speculative_tokens=K), tokenizer=tok)
    if graphs:   # CPU: no CUDA graphs; pretend the runner replays k + 1-token verify steps
        engine._verify_graph_drafts = lambda: K
    if proposer is not None:
        engine.set_proposer(proposer)
    spans: list[list[int]] = []
    launch = engine.runner.launch

    def logged(out, prev=None):
        step = launch(out, prev)
        qsl = step.inputs.query_start_loc
        if any(item.request.spec_token_ids for item in out.scheduled):
            spans.append([b - a for a, b in zip(qsl, qsl[1:])])
        return step
    engine.runner.launch = logged
    params = [SamplingParams(max_new_tokens=9 + 2 * i, ignore_eos=True) for i in range(num)]
    prompts = make_prompts(num, seed=5)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params[i]) for i, p in enumerate(prompts)])}
    return [results[i].output_token_ids for i in range(num)], spans


def test_short_drafts_are_padded_to_k_where_verify_graphs_exist(models, spec_off):
    want = spec_off
    got, spans = _run(models, ShortDrafts(), graphs=True)
    assert got == want                          # lossless, lengths exact (max_new_tokens)
    assert spans, "no step carried drafts"
    assert all(s == [K + 1] * len(s) for s in spans), spans


def test_no_padding_without_verify_graphs(models, spec_off):
    want = spec_off
    got, spans = _run(models, ShortDrafts(), graphs=False)
    assert got == want
    assert any(any(q != K + 1 for q in s) for s in spans), spans   # eager: short spans stay
