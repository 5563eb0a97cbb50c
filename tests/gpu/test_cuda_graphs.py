"""Decode CUDA graphs on a real GPU (runtime/cuda_graphs.py): replay equals the same padded
forward run eagerly (bitwise), and engine greedy output with graphs on equals graphs off and
transformers.

How outputs are compared, and why:
  * replay vs the eager forward of the SAME padded inputs: bitwise (torch.equal). Same kernels,
    same launch sizes, same shapes; a graph only removes the launches' host cost.
  * engine, float32, graphs on vs off: every token equal. The padded GEMMs may pick other
    cuBLAS kernels than the unpadded ones, but fp32 rounding differences do not flip the tiny
    model's argmaxes.
  * engine, float32, vs transformers (CPU float32 generate): >= 95 % of tokens match as common
    prefixes (a near-tie flips a token and everything after it differs; a real bug -- stale
    buffers, wrong rows, K/V written by padding -- breaks nearly every sequence after step one).
  * engine, bfloat16, graphs on vs off: >= 90 % of tokens, same measure. Bitwise equality is not
    promised in bf16: padding changes GEMM shapes (so cuBLAS kernels and reduction orders), and
    the graph's split-KV count is frozen from max_model_len, so bf16 rounding differs and the
    tiny random model has near-ties.
Batch sizes 3 and 17 pad to the captured sizes 4 and 24; replays are counted per size.
Verify steps (k drafts + 1 per sequence) replay their own graphs; with float32 and a proposer
that drafts the reference output (some drafts wrong), speculation must change nothing.
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
from tests.runtime.tiny_models import make_prompts, match_fraction  # noqa: E402

MAX_NEW = 12
MAX_NUM_SEQS = 32  # captured sizes 1, 2, 4, 8, 16, 24, 32


def config(path, dtype, cuda_graphs, **kw):
    return EngineConfig(model=str(path), device="cuda", dtype=dtype, attention_backend="triton",
                        cuda_graphs=cuda_graphs, max_num_seqs=MAX_NUM_SEQS,
                        kv_cache_blocks=1024, **kw)


def run_engine(path, tokenizer, prompts, dtype, cuda_graphs, **kw):
    engine = Engine(config(path, dtype, cuda_graphs, **kw), tokenizer=tokenizer)
    # ignore_eos: every request decodes MAX_NEW tokens, so batches stay at the sizes under test
    # (transformers' reference stops at EOS; match_fraction compares up to its length).
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    reqs = [Request(i, p, params) for i, p in enumerate(prompts)]
    results = {r.request_id: r for r in engine.generate(reqs)}
    assert sorted(results) == list(range(len(prompts)))
    return [results[i].output_token_ids for i in range(len(prompts))], engine.runner


def check_replays(runner, num_prompts):
    graphs = runner.graph_runner
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16, 24, 32]
    padded = {3: 4, 17: 24}[num_prompts]
    # Once every request is past its prefill, each step decodes all of them at the padded size.
    assert graphs.replays_by_size[padded] > 0, dict(graphs.replays_by_size)
    assert graphs.num_replays == sum(graphs.replays_by_size.values()) >= MAX_NEW // 2


@pytest.mark.parametrize("num_prompts", [3, 17])
def test_engine_fp32_graphs_on_equals_off_and_transformers(tiny, tokenizer, num_prompts):
    path, hf = tiny
    prompts = make_prompts(num_prompts, seed=num_prompts)
    on, runner_on = run_engine(path, tokenizer, prompts, "float32", cuda_graphs=True)
    off, runner_off = run_engine(path, tokenizer, prompts, "float32", cuda_graphs=False)
    assert runner_off.graph_runner is None
    check_replays(runner_on, num_prompts)
    diff = [i for i in range(num_prompts) if on[i] != off[i]]
    assert not diff, f"graphs on != off for {diff}: {on[diff[0]]} != {off[diff[0]]}"
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=2)
    assert match_fraction(on, expected) >= 0.95, (on, expected)


@pytest.mark.parametrize("num_prompts", [3, 17])
def test_engine_bf16_graphs_on_matches_off(tiny, tokenizer, num_prompts):
    path, _ = tiny
    prompts = make_prompts(num_prompts, seed=100 + num_prompts)
    on, runner_on = run_engine(path, tokenizer, prompts, "bfloat16", cuda_graphs=True)
    off, _ = run_engine(path, tokenizer, prompts, "bfloat16", cuda_graphs=False)
    check_replays(runner_on, num_prompts)
    assert match_fraction(on, off) >= 0.90, (on, off)


@torch.inference_mode()
def test_replay_equals_padded_eager_forward_bitwise(tiny):
    """Prefill 17 requests eagerly, then decode steps of 17 (padded to 24) and 3 (to 4): the
    replay's hidden states equal the eager forward of the same padded buffers bit for bit, and
    match the plain unpadded eager path within bf16 tolerance."""
    path, _ = tiny
    runner = ModelRunner(config(path, "bfloat16", cuda_graphs=True))
    graphs = runner.graph_runner
    prompts = make_prompts(17, seed=7)
    bs_blocks = runner.block_size
    reqs, next_block = [], 0
    for i, p in enumerate(prompts):
        req = Request(i, p, SamplingParams(max_new_tokens=4))
        need = -(-(len(p) + 4) // bs_blocks)
        req.block_table = list(range(next_block, next_block + need))
        next_block += need
        reqs.append(req)
    prefill = SchedulerOutput([ScheduledRequest(r, r.num_tokens) for r in reqs])
    runner.forward_logits(runner.prepare_inputs(prefill))
    for r in reqs:
        r.num_computed_tokens = r.num_tokens
        r.append_output_token(5 + r.request_id)
    for step_reqs, padded in ((reqs, 24), (reqs[4:7], 4)):
        s = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(r, 1) for r in step_reqs]))
        assert graphs.padded_size_for(s) == padded
        ids, pos, meta = runner._to_device(s)
        plain = runner.model(ids, pos, runner.kv_caches, meta, runner.attn_backend).clone()
        graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens, s.block_tables,
                      padded)
        eager_padded = graphs._forward(padded)[:len(step_reqs)].clone()
        before = graphs.replays_by_size[padded]
        replayed = graphs.run(s).clone()
        assert graphs.replays_by_size[padded] == before + 1
        assert torch.equal(replayed, eager_padded), \
            (replayed.float() - eager_padded.float()).abs().max()
        torch.testing.assert_close(replayed.float(), plain.float(), atol=3e-2, rtol=3e-2)
        for r in step_reqs:
            r.num_computed_tokens += 1
            r.append_output_token(9)


@torch.inference_mode()
def test_graph_logits_equal_the_eager_lm_head_and_argmax_bitwise(tiny):
    """runtime/graph_logits.py: graphs of <= 16 tokens also compute the logits and the greedy
    argmax; a replay's logits equal the eager LM head on the same padded hidden states bit for
    bit and its ids their argmax; larger graphs and graph_logits=False have no tail."""
    from llmbatch.runtime.greedy_argmax import greedy_argmax

    path, _ = tiny
    runner = ModelRunner(config(path, "bfloat16", cuda_graphs=True))
    graphs = runner.graph_runner
    assert graphs.logits_max_rows == 16
    assert sorted(b for b, q in graphs._tails if q == 1) == [1, 2, 4, 8, 16]
    prompts = make_prompts(3, seed=9)
    reqs, next_block = [], 0
    for i, p in enumerate(prompts):
        req = Request(i, p, SamplingParams(max_new_tokens=4))
        need = -(-(len(p) + 4) // runner.block_size)
        req.block_table = list(range(next_block, next_block + need))
        next_block += need
        reqs.append(req)
    runner.forward_logits(runner.prepare_inputs(
        SchedulerOutput([ScheduledRequest(r, r.num_tokens) for r in reqs])))
    for r in reqs:
        r.num_computed_tokens = r.num_tokens
        r.append_output_token(5 + r.request_id)
    s = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(r, 1) for r in reqs]))
    graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens, s.block_tables, 4)
    hidden = graphs._forward(4)
    want_logits = runner.model.compute_logits(hidden).clone()
    want_ids = greedy_argmax(want_logits)
    out = graphs.replay(s)
    assert out.logits.shape == (3, want_logits.shape[1]) and out.logits.dtype == torch.float32
    assert torch.equal(out.logits, want_logits[:3]), \
        (out.logits - want_logits[:3]).abs().max()
    assert torch.equal(out.greedy_ids, want_ids[:3])
    off = ModelRunner(config(path, "bfloat16", cuda_graphs=True, graph_logits=False))
    assert off.graph_runner.logits_max_rows == 0 and off.graph_runner._tails == {}


class _OracleProposer:
    """Drafts the reference continuation, every third draft position wrong (so verify steps
    both accept and reject), always the full k while the reference lasts."""

    def __init__(self, reference):
        self.reference = reference

    def propose(self, request, k):
        ref = self.reference[request.request_id]
        start = len(request.output_token_ids)
        return [tok if (start + j) % 3 else (tok + 1) % 100 + 3
                for j, tok in enumerate(ref[start:start + k])]


@pytest.mark.parametrize("gemv_max_rows", [1, 5])
@pytest.mark.parametrize("num_prompts", [1, 5])
def test_verify_steps_replay_graphs_and_stay_lossless(tiny, tokenizer, num_prompts,
                                                      gemv_max_rows):
    """float32: speculation through verify-step graphs (k = 4, 5 tokens per sequence) gives
    exactly the output without speculation, and the verify graphs were the ones replayed.
    gemv_max_rows 5: a batch-1 verify step runs on the multi-row gemv kernels inside its graph
    (W-SPEC's candidate, bench --gemv-rows8); 5 sequences (25 tokens) stay on cuBLAS."""
    path, _ = tiny
    prompts = make_prompts(num_prompts, seed=40 + num_prompts)
    reference, _ = run_engine(path, tokenizer, prompts, "float32", cuda_graphs=False)
    engine = Engine(config(path, "float32", True, gemv_max_rows=gemv_max_rows),
                    tokenizer=tokenizer)
    assert engine.stats()["gemv_max_rows_active"] == gemv_max_rows
    engine.set_proposer(_OracleProposer(dict(enumerate(reference))))
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params) for i, p in enumerate(prompts)])}
    got = [results[i].output_token_ids for i in range(num_prompts)]
    assert got == reference
    graphs = engine.runner.graph_runner
    assert graphs.verify_tokens == 5 and graphs.verify_sizes == [1, 2, 4, 8, 16]
    padded = {1: 1, 5: 8}[num_prompts]
    assert graphs.verify_replays_by_size[padded] > 0, dict(graphs.verify_replays_by_size)
    assert engine.stats()["num_spec_accepted_tokens"] > 0


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_engine_replays_graphs_and_matches_eager(tiny, tokenizer, method):
    """bitsandbytes layers inside decode graphs: the capture passes its replay check, the
    graphs replay, and the output matches the same quantized engine decoding eagerly (bf16:
    the common-prefix measure, as for the unquantized bf16 test above)."""
    pytest.importorskip("bitsandbytes")
    path, _ = tiny
    prompts = make_prompts(5, seed=60)
    on, runner_on = run_engine(path, tokenizer, prompts, "bfloat16", True, quantization=method)
    off, runner_off = run_engine(path, tokenizer, prompts, "bfloat16", False,
                                 quantization=method)
    assert runner_on.graph_runner is not None, runner_on.cuda_graph_error
    assert runner_on.graph_runner.num_replays > 0
    assert runner_off.graph_runner is None
    assert match_fraction(on, off) >= 0.80, (on, off)
