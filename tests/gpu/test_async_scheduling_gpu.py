"""Async scheduling on a real GPU (docs/async_scheduling.md): the parts the CPU cannot check.
On CUDA the sampled tokens reach the host through a non-blocking copy into pinned memory
(sampler.PendingSample), and a graph step's deferred input ids are written on the device
into the staged buffer before the replay (DecodeGraphRunner.run(step, deferred)).

float32, so the synchronous engine is an exact reference: every token, finish reason and
logprob id must equal it; with graphs on and off; mixed greedy / seeded sampling / stop ids.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402

NUM_PROMPTS = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-async")
    make_model(path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    return path


def _params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return SamplingParams(max_new_tokens=4 + i % 7, ignore_eos=True)
    if i % 3 == 1:
        return SamplingParams(max_new_tokens=12, temperature=0.9, seed=i, logprobs=1)
    return SamplingParams(max_new_tokens=12, stop_token_ids=[17, 33, 101], ignore_eos=True)


def _run(path, tokenizer, prompts, cuda_graphs, async_scheduling, prepare=None, **config_kw):
    """(per prompt: tokens, finish reason, logprob ids), engine. prepare(engine) runs before
    generate (install a proposer, wrap the runner)."""
    config = EngineConfig(model=str(path), device="cuda", dtype="float32",
                          attention_backend="triton", cuda_graphs=cuda_graphs, max_num_seqs=16,
                          kv_cache_blocks=512, async_scheduling=async_scheduling, **config_kw)
    engine = Engine(config, tokenizer=tokenizer)
    if prepare is not None:
        prepare(engine)
    reqs = [Request(i, p, _params(i)) for i, p in enumerate(prompts)]
    results = {r.request_id: r for r in engine.generate(reqs)}
    assert sorted(results) == list(range(len(prompts)))
    return [(results[i].output_token_ids, results[i].finish_reason,
             None if results[i].logprobs is None
             else [lp["token_id"] for lp in results[i].logprobs])
            for i in range(len(prompts))], engine


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_async_equals_sync_on_cuda(tiny, tokenizer, cuda_graphs):
    prompts = make_prompts(NUM_PROMPTS, seed=3)
    want, _ = _run(tiny, tokenizer, prompts, cuda_graphs, async_scheduling=False)
    got, engine = _run(tiny, tokenizer, prompts, cuda_graphs, async_scheduling=True)
    diff = [i for i in range(NUM_PROMPTS) if got[i] != want[i]]
    assert not diff, f"async != sync for {diff}: {got[diff[0]]} != {want[diff[0]]}"
    stats = engine.stats()
    assert stats["async_scheduling"] is True
    if cuda_graphs:
        # Decode steps replayed graphs, with their input ids written on the device.
        assert stats["graph_steps"] > 0
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_sample_async_does_not_wait_for_the_device():
    """sample_async must enqueue without a host sync, or the host waits behind the forward it
    has just launched and async scheduling overlaps nothing. (defect: the sampler built its
    row indices, temperatures and seeded-noise keys with torch.tensor(..., device=cuda), a
    pageable copy that synchronizes the stream, for any sampled or logprobs row.)"""
    from llmbatch.runtime.sampler import Sampler

    torch.manual_seed(0)
    logits = torch.randn(6, 1000, device="cuda")
    params = [SamplingParams(),                                          # greedy
              SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
              SamplingParams(logprobs=3),                                # greedy + logprobs
              SamplingParams(temperature=1.0, seed=2, logprobs=2),
              SamplingParams(temperature=0.5, top_p=0.7),                # default seed
              SamplingParams(temperature=1.0, top_k=5)]
    indices, seeds = [0, 3, 1, 7, 2, 0], [11, 12, 13, 14, 15, 16]
    sampler = Sampler()
    want = sampler.sample(logits, params, indices, default_seeds=seeds)  # warms pinned blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample_async(logits, params, indices, default_seeds=seeds)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pending.result() == want


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_speculation_on_an_async_engine_equals_sync_on_cuda(tiny, tokenizer, cuda_graphs):
    """Speculation on an async engine (docs/async_scheduling.md, "Speculative steps"): the
    batch starts above speculative_max_num_seqs (async steps, device-side inputs) and shrinks
    below it (the step in flight collected, then synchronous verify steps, graphed with
    cuda_graphs). A proposer that knows the reference output makes most drafts right, so the
    verify steps really accept; every token, finish reason and logprob id equals the
    synchronous engine without speculation."""
    prompts = make_prompts(NUM_PROMPTS, seed=3)
    want, _ = _run(tiny, tokenizer, prompts, cuda_graphs, async_scheduling=False)

    class Oracle:
        def propose(self, request, k):
            done = request.num_output_tokens
            return want[request.request_id][0][done:done + k]

    launches = []   # (carried drafts, took input ids from the step in flight)

    def prepare(engine):
        engine.set_proposer(Oracle())
        launch = engine.runner.launch

        def logged(out, prev=None):
            step = launch(out, prev)
            launches.append((any(i.request.spec_token_ids for i in out.scheduled),
                             bool(step.inputs.deferred_rows)))
            return step
        engine.runner.launch = logged
    got, engine = _run(tiny, tokenizer, prompts, cuda_graphs, async_scheduling=True,
                       prepare=prepare, speculative_max_num_seqs=4)
    diff = [i for i in range(NUM_PROMPTS) if got[i] != want[i]]
    assert not diff, f"async+spec != sync for {diff}: {got[diff[0]]} != {want[diff[0]]}"
    assert any(drafts for drafts, _ in launches), "no verify step"
    assert any(deferred for _, deferred in launches), "no async overlap"
    assert not any(drafts and deferred for drafts, deferred in launches)
    assert engine.stats()["num_spec_accepted_tokens"] > 0
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and engine._in_flight is None
