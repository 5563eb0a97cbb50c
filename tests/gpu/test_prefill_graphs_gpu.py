"""Prefill CUDA graphs on a real GPU (runtime/prefill_graphs.py, engine.prefill_graph_max_tokens):
the capture passes its replay check, a replay equals the eager forward of the same padded
buffers bit for bit and the plain unpadded step within bf16 rounding, and engine greedy output
with them equals the engine without them (float32, token for token) and transformers.

Every engine here runs one sequence at a time (max_num_seqs 1), so every prefill step is a
one-sequence step; the chunked case (max_num_batched_tokens 16) prefills each prompt in chunks
after its own first chunk, the path of a prefix-cache hit. The tiny Llama: tests/gpu/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.model_runner import ModelRunner  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbatch.runtime.scheduler_output import ScheduledRequest, SchedulerOutput  # noqa: E402
from tests.runtime.test_engine_greedy import hf_greedy  # noqa: E402
from tests.runtime.test_prefill_graphs_cpu import expected_prefill_graph_steps  # noqa: E402
from tests.runtime.tiny_models import make_prompts, match_fraction  # noqa: E402

MAX_NEW = 10
MAX_TOKENS = 96   # buckets 16, 24, 32, 48, 64, 96: every prompt here fits


def config(path, dtype, max_tokens, **kw):
    return EngineConfig(model=str(path), device="cuda", dtype=dtype, attention_backend="triton",
                        max_num_seqs=1, kv_cache_blocks=512, prefill_graph_max_tokens=max_tokens,
                        **kw)


def run_engine(path, tokenizer, prompts, dtype, max_tokens, **kw):
    engine = Engine(config(path, dtype, max_tokens, **kw), tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params) for i, p in enumerate(prompts)])}
    assert sorted(results) == list(range(len(prompts)))
    cached = [results[i].num_cached_prompt_tokens for i in range(len(prompts))]
    return [results[i].output_token_ids for i in range(len(prompts))], engine, cached


@pytest.mark.parametrize("chunk", [None, 16])
def test_engine_fp32_prefill_graphs_equal_eager_and_transformers(tiny, tokenizer, chunk):
    path, hf = tiny
    prompts = make_prompts(6, seed=21)
    kw = {} if chunk is None else dict(max_num_batched_tokens=chunk)
    on, engine_on, cached = run_engine(path, tokenizer, prompts, "float32", MAX_TOKENS, **kw)
    off, engine_off, _ = run_engine(path, tokenizer, prompts, "float32", 0, **kw)
    stats = engine_on.stats()
    assert stats["prefill_graphs_active"] and stats["prefill_graph_error"] is None
    # Every prefill step replayed a graph: a prefill graph, but for 1-token and 5-token
    # (k + 1) steps, which the decode / verify graphs take (17 = 16 + a 1-token chunk here).
    want = expected_prefill_graph_steps([len(p) for p in prompts], cached, chunk,
                                        chunk or MAX_TOKENS)
    assert stats["prefill_graph_steps"] == want, stats
    assert stats["eager_steps"] == 0, stats
    assert engine_off.stats()["prefill_graph_steps"] == 0
    diff = [i for i in range(len(prompts)) if on[i] != off[i]]
    assert not diff, f"prefill graphs on != off for {diff}: {on[diff[0]]} != {off[diff[0]]}"
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=2)
    assert match_fraction(on, expected) >= 0.95, (on, expected)


@torch.inference_mode()
def test_replay_equals_padded_eager_forward_bitwise(tiny):
    """A 20-token prompt (bucket 24), then 28 more tokens of the same sequence after it
    (bucket 32, 20 cached), then an exact 32-token span: each replay's hidden states equal the
    eager forward of the same padded buffers bit for bit (same kernels, same shapes) and the
    plain unpadded eager step within bf16 rounding; the K/V the replay wrote is the K/V the
    unpadded step writes."""
    path, _ = tiny
    runner = ModelRunner(config(path, "bfloat16", 64))
    graphs = runner.prefill_graph_runner
    assert graphs is not None, runner.prefill_graph_error
    assert graphs.buckets == [16, 24, 32, 48, 64]
    prompt = [(7 * i) % 90 + 3 for i in range(80)]
    req = Request(0, prompt, SamplingParams(max_new_tokens=4))
    req.block_table = list(range(1, 1 + -(-84 // runner.block_size)))
    for n, bucket in ((20, 24), (28, 32), (32, 32)):
        s = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(req, n)]))
        assert graphs.bucket_for(s) == bucket
        ids, pos, meta = runner._to_device(s)
        plain = runner.model(ids, pos, runner.kv_caches, meta, runner.attn_backend).clone()
        plain_kv = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens[0],
                      s.block_tables[0], bucket)
        eager = graphs._forward(bucket)[:n].clone()
        replayed = graphs.run(s).clone()
        assert torch.equal(replayed, eager)
        torch.testing.assert_close(replayed.float(), plain.float(), atol=3e-2, rtol=3e-2)
        slots = torch.tensor(s.slot_mapping, device="cuda")
        for (k, v), (pk, pv) in zip(runner.kv_caches, plain_kv):
            for cache, want in ((k, pk), (v, pv)):
                got = cache.flatten(0, 1).index_select(0, slots).float()
                ref = want.flatten(0, 1).index_select(0, slots).float()
                torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
        req.num_computed_tokens += n
