"""The pure-Python parts of runtime/prefill_graphs.py on CPU: the buckets, which steps qualify,
the staging layout, and (capture=False, eager on CPU) that a prompt padded by a second
sequence through the graph buffers computes what the eager step computes for its rows and
writes K/V only at its own slots. With the torch backend and, under TRITON_INTERPRET=1, the
Triton one (the backend the graphs run on). Capture and replay: tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import copy

import pytest
import torch

from llmbatch.runtime.attention import get_attention_backend
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.model_runner import ModelRunner
from llmbatch.runtime.prefill_graphs import PrefillGraphRunner, prefill_buckets
from tests.runtime.test_cuda_graphs_cpu import (BLOCK, assert_only_slots_written,
                                                 make_request, prepare)
from tests.runtime.tiny_models import make_model


def test_buckets_are_powers_of_two_and_midpoints_up_to_the_limit():
    assert prefill_buckets(16) == [16]
    assert prefill_buckets(20) == [16, 20]
    assert prefill_buckets(64) == [16, 24, 32, 48, 64]
    assert prefill_buckets(512) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert prefill_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    with pytest.raises(ValueError, match=">= 16"):
        prefill_buckets(8)


@pytest.mark.parametrize("value", [-1, 1, 15, 8193, 16.0, True, "512"])
def test_config_refuses_other_values(value):
    with pytest.raises(ValueError, match="prefill_graph_max_tokens must be 0"):
        EngineConfig(model="m", prefill_graph_max_tokens=value)
    assert EngineConfig(model="m").prefill_graph_max_tokens == 0   # off unless asked
    assert EngineConfig(model="m", prefill_graph_max_tokens=16).prefill_graph_max_tokens == 16


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, num_heads=4, num_kv_heads=2, head_dim=16)
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=BLOCK,
                          kv_cache_blocks=24, max_model_len=64, cuda_graphs=True,
                          prefill_graph_max_tokens=32)
    return ModelRunner(config)


def graphs_for(runner, backend=None, kv_caches=None):
    return PrefillGraphRunner(runner.model, kv_caches or copy.deepcopy(runner.kv_caches),
                              backend or runner.attn_backend, max_tokens=32,
                              max_model_len=runner.max_model_len, block_size=BLOCK,
                              device=torch.device("cpu"), capture=False)


def test_cpu_runner_has_no_prefill_graphs(runner):
    # No decode graphs on CPU, so no prefill graphs either (and the stats say so).
    assert runner.prefill_graph_runner is None and runner.prefill_graph_error is None


def test_which_steps_qualify(runner):
    graphs = graphs_for(runner)
    assert graphs.buckets == [16, 24, 32] and graphs.max_blocks == 16
    a = make_request("a", list(range(3, 23)), 0, [1, 2, 3, 4, 5])      # 20 prompt tokens
    assert graphs.bucket_for(prepare([(a, 20)])) == 24
    assert graphs.bucket_for(prepare([(a, 3)])) == 16                  # a short chunk pads to 16
    b = make_request("b", list(range(3, 40)), 5, list(range(1, 11)))   # 32 after a prefix hit
    assert graphs.bucket_for(prepare([(b, 32)])) == 32                 # exactly a bucket
    c = make_request("c", list(range(3, 43)), 0, list(range(1, 11)))
    assert graphs.bucket_for(prepare([(c, 40)])) is None               # over the largest bucket
    assert graphs.bucket_for(prepare([(a, 20), (b, 4)])) is None       # two sequences
    wide = make_request("w", list(range(3, 23)), 0, list(range(1, 18)))  # > max_blocks
    assert graphs.bucket_for(prepare([(wide, 20)])) is None
    assert graphs.run(prepare([(c, 40)])) is None
    with pytest.raises(ValueError, match="CUDA device"):
        PrefillGraphRunner(runner.model, runner.kv_caches, runner.attn_backend, max_tokens=32,
                           max_model_len=64, block_size=BLOCK, device=torch.device("cpu"))


def test_staging_layout_pads_with_a_second_sequence(runner):
    graphs = graphs_for(runner)
    graphs._stage([10, 11, 12], [5, 6, 7], [21, 22, 23], 8, [5, 2], 16)
    ints = graphs._ints[:3 * 16 + 5].tolist()
    assert ints[:16] == [10, 11, 12] + [0] * 13           # ids, padding id 0
    assert ints[16:32] == [5, 6, 7] + [0] * 13            # positions
    assert ints[32:48] == [21, 22, 23] + [-1] * 13        # slots: padding never stored
    assert ints[48:] == [8, 13, 0, 3, 16]                 # seq_lens, query_start_loc
    assert graphs._block_tables[0, :2].tolist() == [5, 2]
    assert graphs._block_tables[1].tolist() == [0] * graphs.max_blocks
    with pytest.raises(ValueError, match="at most 16 tokens"):
        graphs._stage([1] * 17, [1] * 17, [1] * 17, 17, [1, 2], 16)


def _check_padded_prefill_matches_eager(runner, backend, dtype_atol):
    """Two prompts prefilled one at a time, both ways (the second after a prefix of 8 cached
    tokens, then a span that exactly fills its bucket): the same hidden states for the real
    rows, the same K/V at the real slots, every other slot of the pool untouched."""
    graphs = graphs_for(runner, backend)
    eager_kv = copy.deepcopy(graphs.kv_caches)
    a = make_request("a", [5, 9, 14, 3, 7, 22, 8, 30, 31, 2, 6, 9, 10, 11, 40, 41, 7, 7, 8, 12],
                     0, [3, 5, 7, 9, 11])
    b = make_request("b", list(range(20, 60)) + [4] * 24, 8,
                     [0, 2, 4, 6, 8, 10, 12] + list(range(13, 22)))
    for req, n in ((a, 20), (b, 24), (b, 32)):
        s = prepare([(req, n)])
        q = graphs.bucket_for(s)
        before = [k.clone() for k, _ in graphs.kv_caches]
        with torch.inference_mode():
            ids, pos, meta = runner._to_device(s)
            want = runner.model(ids, pos, eager_kv, meta, backend)
            graphs._stage(s.input_ids, s.positions, s.slot_mapping, s.seq_lens[0],
                          s.block_tables[0], q)
            got = graphs._forward(q)[:n]
        torch.testing.assert_close(got, want, atol=dtype_atol, rtol=dtype_atol)
        for (kg, vg), (ke, ve) in zip(graphs.kv_caches, eager_kv):
            torch.testing.assert_close(kg, ke, atol=dtype_atol, rtol=dtype_atol)
            torch.testing.assert_close(vg, ve, atol=dtype_atol, rtol=dtype_atol)
        assert_only_slots_written(graphs.kv_caches, before, s.slot_mapping)
        req.num_computed_tokens += n


def test_padded_prefill_matches_eager_torch_backend(runner):
    _check_padded_prefill_matches_eager(runner, runner.attn_backend, 1e-5)


def test_padded_prefill_matches_eager_triton_backend_interpreted(runner):
    # The backend the graphs replay on (CUDA); in the interpreter on CPU, float32.
    _check_padded_prefill_matches_eager(runner, get_attention_backend("triton", "cpu"), 1e-4)


def test_a_draft_model_runner_takes_no_prefill_graphs():
    # The draft runs eagerly (no decode graphs either); it must not log the setting as ignored.
    from llmbatch.runtime.draft_proposer import draft_runner_config

    cfg = EngineConfig(model="m", speculative_method="draft", draft_model="d",
                       prefill_graph_max_tokens=64)
    draft = draft_runner_config(cfg)
    assert draft.cuda_graphs is False and draft.prefill_graph_max_tokens == 0


def expected_prefill_graph_steps(prompt_lens, cached, chunk, max_tokens, verify_tokens=5):
    """Steps that replay a prefill graph when each prompt is prefilled alone (max_num_seqs 1):
    its uncached tokens (len - cached) in chunks of `chunk` tokens (None: one step), each a
    replay when it holds 2..max_tokens tokens other than verify_tokens. ModelRunner.
    forward_logits asks the decode graphs first, and they take any step whose spans are all 1
    token (a 1-token chunk, the last token after a prefix hit) or all verify_tokens = k + 1
    tokens (captured whether or not a proposer is set): those count as graph_steps. The GPU
    tests' expected prefill_graph_steps (tests/gpu/test_prefill_graphs_gpu.py,
    test_engine_bf16_vs_transformers.py)."""
    count = 0
    for length, hit in zip(prompt_lens, cached):
        left = length - hit
        step = chunk or left
        sizes = [min(step, left - i) for i in range(0, left, step)]
        count += sum(1 for n in sizes if 1 < n <= max_tokens and n != verify_tokens)
    return count


def _routed_kinds(runner, prompt_lens, chunk, max_tokens, verify_tokens=5):
    """How ModelRunner.forward_logits routes each one-sequence prefill step of these prompts:
    the decode / verify graphs first (graph_key_for), then the prefill graphs (bucket_for),
    with buffer-only runners (capture=False) of the GPU tests' settings (max_num_seqs 1)."""
    from llmbatch.runtime.cuda_graphs import DecodeGraphRunner

    cpu = torch.device("cpu")
    decode = DecodeGraphRunner(runner.model, runner.kv_caches, runner.attn_backend,
                               max_num_seqs=1, max_model_len=256, block_size=16, device=cpu,
                               verify_tokens=verify_tokens, verify_max_num_seqs=16,
                               capture=False)
    prefill = PrefillGraphRunner(runner.model, runner.kv_caches, runner.attn_backend,
                                 max_tokens=max_tokens, max_model_len=256, block_size=16,
                                 device=cpu, capture=False)
    kinds = []
    for i, length in enumerate(prompt_lens):
        req = make_request(i, [3 + j % 50 for j in range(length)], 0, range(1, 17))
        step = chunk or length
        while req.num_computed_tokens < length:
            n = min(step, length - req.num_computed_tokens)
            s = prepare([(req, n)])
            kinds.append("graph" if decode.graph_key_for(s) is not None
                         else "prefill_graph" if prefill.bucket_for(s) is not None
                         else "eager")
            req.num_computed_tokens += n
    return kinds


@pytest.mark.parametrize("prompt_lens,chunk,max_tokens", [
    ([17, 59, 28, 48, 43, 10], None, 96),   # test_prefill_graphs_gpu.py's prompts
    ([17, 59, 28, 48, 43, 10], 16, 16),     # chunked: 17 = 16 + a 1-token chunk
    (list(range(1, 41)), None, 128),        # bf16-vs-transformers' 5-token prompt among them
    (list(range(1, 41)), 8, 16),
])
def test_expected_prefill_graph_steps_is_how_steps_route(runner, prompt_lens, chunk,
                                                         max_tokens):
    kinds = _routed_kinds(runner, prompt_lens, chunk, max_tokens)
    assert "eager" not in kinds
    assert kinds.count("prefill_graph") == expected_prefill_graph_steps(
        prompt_lens, [0] * len(prompt_lens), chunk, max_tokens)
    if chunk == 16:   # every chunk a replay, as the GPU test once counted, is one too many
        assert kinds.count("prefill_graph") == sum(-(-n // 16) for n in prompt_lens) - 1
