"""The pure-Python parts of runtime/cuda_graphs.py, on CPU: padded sizes, which steps qualify,
the staging layout, and (with capture=False, eager on CPU) that a padded decode through the
graph buffers computes what the eager path computes and writes no K/V for padding rows.
Speculative verify steps (every span k + 1 tokens) go through the same checks.
The capture/replay itself runs in tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import copy

import pytest
import torch

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.cuda_graphs import (DecodeGraphRunner, capture_batch_sizes,
                                          fill_decode_inputs,
                                          padded_batch_size, uniform_span_len)
from llmbatch.runtime.model_runner import ModelRunner
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.scheduler_output import ScheduledRequest, SchedulerOutput
from tests.runtime.tiny_models import make_model

BLOCK = 4


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    full = capture_batch_sizes(256)
    assert full[:5] == [1, 2, 4, 8, 16] and full[-2:] == [248, 256] and len(full) == 35
    assert capture_batch_sizes(300)[-4:] == [256, 272, 288, 300]
    assert capture_batch_sizes(10_000)[-2:] == [496, 512]  # capped at 512
    assert capture_batch_sizes(64, cap=40)[-2:] == [32, 40]
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_batch_sizes(0)


def test_padded_batch_size():
    sizes = capture_batch_sizes(32)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == \
        [1, 2, 4, 8, 8, 16, 24, 32]
    assert padded_batch_size(33, sizes) is None


# ---------------------------------------------------------------- which steps qualify

def make_request(rid, prompt, computed, table, spec=()):
    req = Request(rid, prompt, SamplingParams(max_new_tokens=8))
    req.num_computed_tokens = computed
    req.block_table = list(table)
    req.spec_token_ids = list(spec)
    return req


class _Prep:  # prepare_inputs only reads block_size
    block_size = BLOCK


def prepare(items):
    out = SchedulerOutput([ScheduledRequest(r, n) for r, n in items])
    return ModelRunner.prepare_inputs(_Prep(), out)


def test_one_token_spans_qualify_as_decode_and_mixed_spans_do_not():
    a = make_request("a", list(range(3, 10)), 6, [5, 6])         # last prompt token: decode-like
    b = make_request("b", list(range(3, 5)), 1, [7])
    assert uniform_span_len(prepare([(a, 1), (b, 1)])) == (2, 1)
    c = make_request("c", list(range(3, 12)), 0, [1, 2, 3])      # a prefill span
    assert uniform_span_len(prepare([(a, 1), (c, 9)])) is None
    d = make_request("d", list(range(3, 8)), 4, [4, 9], spec=[11, 12])
    assert uniform_span_len(prepare([(a, 1), (d, 3)])) is None   # verifying spec tokens
    assert uniform_span_len(prepare([])) is None


def test_fill_decode_inputs_pads_harmlessly():
    ints = torch.full((4 * 8,), 99, dtype=torch.int64)
    bt = torch.full((8 * 5,), 99, dtype=torch.int32)
    width = fill_decode_inputs(ints, bt, [10, 11, 12], [5, 0, 8], [21, 4, 34], [6, 1, 9],
                               [[5, 2], [1], [3, 4, 8]], padded_size=4)
    assert width == 3
    assert ints[:16].tolist() == [10, 11, 12, 0,      # input_ids, padding id 0
                                  5, 0, 8, 0,         # positions
                                  21, 4, 34, -1,      # slot_mapping: padding writes nothing
                                  6, 1, 9, 1]         # seq_lens: padding attends to one key
    assert ints[16:].tolist() == [99] * 16            # beyond 4 * padded_size: untouched
    assert bt[:12].view(4, 3).tolist() == [[5, 2, 0], [1, 0, 0], [3, 4, 8], [0, 0, 0]]
    assert bt[12:].tolist() == [99] * 28
    # A batch of only padding (what capture uses): width 1, every row harmless.
    assert fill_decode_inputs(ints, bt, [], [], [], [], [], padded_size=2) == 1
    assert ints[:8].tolist() == [0, 0, 0, 0, -1, -1, 1, 1]
    with pytest.raises(ValueError, match="per sequence"):
        fill_decode_inputs(ints, bt, [1], [1, 2], [1], [1], [[1]], padded_size=2)
    with pytest.raises(ValueError, match="do not fit"):
        fill_decode_inputs(ints, bt, [1, 2], [1, 2], [1, 2], [1, 2], [[1], [2]], padded_size=1)
    with pytest.raises(ValueError, match="too small"):
        fill_decode_inputs(ints, bt, [1], [1], [1], [1], [[1, 2, 3, 4, 5, 6]], padded_size=8)


# ---------------------------------------------------------------- the buffers, eagerly on CPU

def assert_only_slots_written(kv_caches, keys_before, slots) -> None:
    """Every key-cache slot outside `slots` (a step's slot_mapping) still holds what it held
    in keys_before (the key caches cloned before the step): padding wrote nothing. Shared
    with test_prefill_graphs_cpu.py."""
    written = set(slots)
    for (k, _), old in zip(kv_caches, keys_before):
        flat_new, flat_old = k.flatten(0, 1), old.flatten(0, 1)
        untouched = [i for i in range(flat_new.shape[0]) if i not in written]
        assert torch.equal(flat_new[untouched], flat_old[untouched])


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, num_heads=4, num_kv_heads=2, head_dim=16)
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=BLOCK,
                          kv_cache_blocks=16, max_model_len=64, cuda_graphs=True)
    return ModelRunner(config)


def test_cpu_runner_has_no_graphs(runner):
    assert runner.graph_runner is None


def test_padded_decode_through_buffers_matches_eager(runner):
    """Prefill three requests eagerly, then two decode steps of different widths both ways:
    same hidden states, same K/V for real slots, and every other slot of the pool untouched."""
    prompts = [[5, 9, 14, 3, 7, 22, 8], [40, 41], [7, 7, 8, 30, 31, 2, 6, 9, 10, 11]]
    tables = [[3, 5], [0], [6, 1, 9]]  # block 0 is real and holds request 1's tokens
    reqs = [make_request(i, p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))]
    runner.forward_logits(prepare([(r, r.num_tokens) for r in reqs]))  # prefill, eager
    for r, tok in zip(reqs, (11, 12, 13)):
        r.num_computed_tokens = r.num_tokens
        r.append_output_token(tok)

    graphs = DecodeGraphRunner(runner.model, copy.deepcopy(runner.kv_caches), runner.attn_backend,
                               max_num_seqs=8, max_model_len=runner.max_model_len,
                               block_size=BLOCK, device=torch.device("cpu"), capture=False)
    assert graphs.sizes == [1, 2, 4, 8] and graphs.max_blocks == 16
    eager_kv = copy.deepcopy(runner.kv_caches)
    # Step 1: all three (padded to 4, width 3); step 2: request 1 alone (width 1, so columns
    # 1..2 of row 0 keep step 1's stale block ids and must not be read).
    for step_reqs in (reqs, reqs[1:2]):
        s = prepare([(r, 1) for r in step_reqs])
        bs = graphs.padded_size_for(s)
        assert bs == (4 if len(step_reqs) == 3 else 1)
        before = [k.clone() for k, _ in graphs.kv_caches]
        with torch.inference_mode():
            ids, pos, meta = runner._to_device(s)
            want = runner.model(ids, pos, eager_kv, meta, runner.attn_backend)
            graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens,
                          s.block_tables, bs)
            got = graphs._forward(bs)[:len(step_reqs)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for (kg, vg), (ke, ve) in zip(graphs.kv_caches, eager_kv):
            torch.testing.assert_close(kg, ke, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vg, ve, atol=1e-5, rtol=1e-5)
        assert_only_slots_written(graphs.kv_caches, before, s.slot_mapping)
        for r in step_reqs:
            r.num_computed_tokens += 1
            r.append_output_token(20)


def test_unchanged_block_tables_are_not_uploaded_again(runner):
    """A decode step whose padded block tables equal the previous step's (batch size, width
    and ids) skips their two copies (host -> staging -> block_tables); any change uploads.
    Every step still computes what the eager step computes, so the device buffer holds the
    step's tables whether or not they were copied."""
    prompts = [[5, 9, 14, 3, 7, 22], [40, 41]]
    tables = [[3, 5, 7], [0, 2]]
    reqs = [make_request(i, p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))]
    runner.forward_logits(prepare([(r, r.num_tokens) for r in reqs]))  # prefill, eager
    for r in reqs:
        r.num_computed_tokens = r.num_tokens
        r.append_output_token(11)
    graphs = DecodeGraphRunner(runner.model, copy.deepcopy(runner.kv_caches), runner.attn_backend,
                               max_num_seqs=4, max_model_len=runner.max_model_len,
                               block_size=BLOCK, device=torch.device("cpu"), capture=False)
    eager_kv = copy.deepcopy(runner.kv_caches)
    uploads = []

    def step(step_reqs):
        s = prepare([(r, 1) for r in step_reqs])
        bs = graphs.padded_size_for(s)
        with torch.inference_mode():
            ids, pos, meta = runner._to_device(s)
            want = runner.model(ids, pos, eager_kv, meta, runner.attn_backend)
            before = graphs.block_table_uploads
            graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens,
                          s.block_tables, bs)
            uploads.append(graphs.block_table_uploads - before)
            got = graphs._forward(bs)[:len(step_reqs)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for r in step_reqs:
            r.num_computed_tokens += 1
            r.append_output_token(20)

    step(reqs)          # first step: uploaded
    step(reqs)          # same tables, same batch: skipped
    reqs[1].block_table = [0, 2, 4]   # request 1's table grows by a block
    step(reqs)          # wider: uploaded
    step(reqs)          # skipped
    reqs[0].block_table[2] = 8        # same width, another block id (e.g. after a copy)
    step(reqs)          # uploaded
    step(reqs[:1])      # another batch size: uploaded
    assert uploads == [1, 0, 1, 0, 1, 1]


def test_padded_size_for_falls_back(runner):
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, runner.attn_backend,
                               max_num_seqs=2, max_model_len=8, block_size=BLOCK,
                               device=torch.device("cpu"), capture=False)
    a = make_request("a", [3, 4, 5], 2, [1])
    b = make_request("b", [3, 4, 5], 2, [2])
    c = make_request("c", [3, 4, 5], 2, [4])
    assert graphs.padded_size_for(prepare([(a, 1), (b, 1)])) == 2
    assert graphs.padded_size_for(prepare([(a, 1), (b, 1), (c, 1)])) is None  # > largest size
    wide = make_request("w", [3, 4, 5], 2, [1, 2, 3])  # wider than max_model_len's 2 blocks
    assert graphs.padded_size_for(prepare([(wide, 1)])) is None
    assert graphs.run(prepare([(a, 1), (c, 1), (b, 1)])) is None
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphRunner(runner.model, runner.kv_caches, runner.attn_backend, max_num_seqs=2,
                          max_model_len=8, block_size=BLOCK, device=torch.device("cpu"))


def test_sliding_window_refused_at_start_up(tmp_path):
    import transformers as tf

    cfg = tf.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, max_position_embeddings=128, sliding_window=32)
    tf.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's sliding_window=32"):
        ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", kv_cache_blocks=8))
    ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", kv_cache_blocks=8,
                             max_model_len=32))  # within the window: fine


# ---------------------------------------------------------------- speculative verify steps

def test_uniform_span_len_qualifies_equal_spans_only():
    a = make_request("a", list(range(3, 10)), 6, [5, 6])
    b = make_request("b", list(range(3, 5)), 1, [7])
    assert uniform_span_len(prepare([(a, 1), (b, 1)])) == (2, 1)
    d = make_request("d", list(range(3, 8)), 4, [4, 9], spec=[11, 12])
    e = make_request("e", list(range(3, 6)), 2, [8, 12], spec=[13, 14])
    assert uniform_span_len(prepare([(d, 3), (e, 3)])) == (2, 3)    # verify, k = 2
    f = make_request("f", list(range(3, 6)), 2, [10], spec=[15])
    assert uniform_span_len(prepare([(d, 3), (f, 2)])) is None      # fewer drafts for f
    # 4 tokens over 2 spans of 1 and 3: divisible, still not uniform.
    assert uniform_span_len(prepare([(a, 1), (d, 3)])) is None
    assert uniform_span_len(prepare([])) is None


def test_fill_verify_inputs_pads_whole_spans():
    ints = torch.full((64,), 99, dtype=torch.int64)
    bt = torch.full((16,), 99, dtype=torch.int32)
    # One real sequence of q = 2 tokens at positions 5, 6, padded to 2 sequences.
    width = fill_decode_inputs(ints, bt, [10, 11], [5, 6], [21, 22], [7], [[5, 2]],
                               padded_size=2, tokens_per_seq=2)
    assert width == 2
    n = 3 * 2 * 2 + 2
    assert ints[:n].tolist() == [10, 11, 0, 0,      # ids, padding tokens 0
                                 5, 6, 0, 0,        # positions
                                 21, 22, -1, -1,    # slots: padding never stored
                                 7, 2]              # seq_lens: padding sequence = its q tokens
    assert ints[n:].tolist() == [99] * (64 - n)
    assert bt[:4].view(2, 2).tolist() == [[5, 2], [0, 0]]
    with pytest.raises(ValueError, match="per sequence"):
        fill_decode_inputs(ints, bt, [10], [5], [21], [7], [[5]], padded_size=2,
                           tokens_per_seq=2)


def test_padded_verify_through_buffers_matches_eager(runner):
    """Verify steps of k = 2 drafts (3 tokens per sequence), 3 sequences padded to 4 and one
    alone: the graph buffers compute what the eager path computes, and write K/V only at the
    real slots."""
    prompts = [[5, 9, 14, 3, 7, 22, 8], [40, 41, 3], [7, 7, 8, 30, 31, 2, 6, 9, 10, 11]]
    tables = [[3, 5, 11], [0, 12], [6, 1, 9]]  # room for the 2 drafts past each prompt
    reqs = [make_request(i, p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))]
    runner.forward_logits(prepare([(r, r.num_tokens - 1) for r in reqs]))  # all but the last
    for r in reqs:
        r.num_computed_tokens = r.num_tokens - 1
        r.spec_token_ids = [17, 18]

    graphs = DecodeGraphRunner(runner.model, copy.deepcopy(runner.kv_caches), runner.attn_backend,
                               max_num_seqs=8, max_model_len=runner.max_model_len,
                               block_size=BLOCK, device=torch.device("cpu"), verify_tokens=3,
                               verify_max_num_seqs=4, capture=False)
    assert graphs.verify_sizes == [1, 2, 4]
    assert (4, 3) in graphs.keys and (8, 3) not in graphs.keys
    eager_kv = copy.deepcopy(runner.kv_caches)
    for step_reqs, padded in ((reqs, 4), (reqs[1:2], 1)):
        s = prepare([(r, 3) for r in step_reqs])
        assert graphs.graph_key_for(s) == (padded, 3)
        before = [k.clone() for k, _ in graphs.kv_caches]
        with torch.inference_mode():
            ids, pos, meta = runner._to_device(s)
            want = runner.model(ids, pos, eager_kv, meta, runner.attn_backend)
            graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens,
                          s.block_tables, padded, 3)
            got = graphs._forward(padded, 3)[:3 * len(step_reqs)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for (kg, _), (ke, _) in zip(graphs.kv_caches, eager_kv):
            torch.testing.assert_close(kg, ke, atol=1e-5, rtol=1e-5)
        assert_only_slots_written(graphs.kv_caches, before, s.slot_mapping)
    # Five sequences exceed the verify sizes (largest 4): eager.
    many = [make_request(f"m{i}", [3, 4, 5], 2, [1, 2], spec=[6, 7]) for i in range(5)]
    assert graphs.graph_key_for(prepare([(r, 3) for r in many])) is None
    # Another draft count than the captured one: eager.
    one = make_request("one", [3, 4, 5], 2, [15], spec=[6])
    assert graphs.graph_key_for(prepare([(one, 2)])) is None


def test_replay_check_refuses_a_graph_that_computes_something_else(runner):
    """_check_replay (run after each capture) accepts a replay that matches the eager forward
    within tolerance and raises on one that does not (a kernel that did not survive capture):
    the runner then decodes eagerly instead of emitting wrong tokens."""
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, runner.attn_backend,
                               max_num_seqs=2, max_model_len=8, block_size=BLOCK,
                               device=torch.device("cpu"), capture=False)
    eager = torch.randn(2, 8)

    class FakeGraph:
        def __init__(self, result):
            self.result = result

        def replay(self):
            graphs._outputs[(2, 1)].copy_(self.result)

    graphs._outputs[(2, 1)] = torch.zeros(2, 8)
    graphs._graphs[(2, 1)] = FakeGraph(eager + 1e-3)
    graphs._check_replay(2, 1, (eager,))                   # within tolerance: accepted
    graphs._graphs[(2, 1)] = FakeGraph(eager + 1.0)
    with pytest.raises(RuntimeError, match="differs from the eager forward"):
        graphs._check_replay(2, 1, (eager,))
    nan = eager.clone()
    nan[0, 0] = float("nan")
    graphs._graphs[(2, 1)] = FakeGraph(nan)
    with pytest.raises(RuntimeError, match="differs"):
        graphs._check_replay(2, 1, (eager,))
