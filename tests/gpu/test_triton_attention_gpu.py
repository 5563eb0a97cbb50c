"""The Triton attention cases of tests/runtime/test_triton_attention.py, compiled on CUDA
(float32, float16 and bfloat16), plus what only a GPU can show: the split-KV heuristic on
long contexts, a 1B-shaped mixed batch, and capture/replay inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tests.runtime.test_triton_attention import (  # noqa: E402
    CASES, TOLERANCE, make_case, run_both, store_kv_check,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# The oracle runs cuBLAS/SDPA in fp32 on the GPU; allow for its reduction order.
GPU_TOLERANCE = {**TOLERANCE, torch.float32: 1e-4}


def assert_close(got, want, dtype):
    assert not torch.isnan(got).any(), "an output element was left unwritten (still NaN)"
    tol = GPU_TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


# float32 (exact IEEE dots) compiles slowest; a GPU run's time is scarce, so it covers three
# cases that together touch decode, prefill with prefix, GQA 8 and split-KV.
FP32_CASES = ("decode_gqa4", "mixed_gqa8", "split_mixed")
PARAMS = [pytest.param(*case, dtype, id=f"{case[0]}-{dtype_id}")
          for case in CASES for dtype, dtype_id in zip(DTYPES, DTYPE_IDS)
          if dtype != torch.float32 or case[0] in FP32_CASES]


@pytest.mark.parametrize("name,spans,heads,kv_heads,head_dim,block_size,kwargs,dtype", PARAMS)
def test_forward_matches_torch_cuda(name, spans, heads, kv_heads, head_dim, block_size,
                                    kwargs, dtype):
    case = make_case(spans, heads, kv_heads, head_dim, block_size, dtype, device="cuda")
    got, want = run_both(case, TritonAttentionBackend(**kwargs))
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_store_kv_matches_torch_cuda(dtype):
    store_kv_check("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_split_heuristic_long_context_decode(dtype, head_dim):
    """Few long decodes: the heuristic must split, and the split result must be right."""
    spans = [(4000, 1), (2500, 1), (17, 1)]
    case = make_case(spans, 32, 8, head_dim, 16, dtype, device="cuda")
    backend = TritonAttentionBackend()
    assert backend._num_splits(case.meta, 8, case.query.device) > 1
    got, want = run_both(case, backend)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_one_b_shape_mixed_batch(block_size):
    """1B shape (32 heads, 8 KV heads, head_dim 64): 60 decodes, two prefill chunks after
    prefix hits, and k+1 = 5 speculative spans, in bf16."""
    spans = ([(i * 37 % 700, 1) for i in range(60)] + [(256, 300), (0, 211)]
             + [(100 + i, 5) for i in range(4)])
    case = make_case(spans, 32, 8, 64, block_size, torch.bfloat16, device="cuda", seed=3)
    got, want = run_both(case, TritonAttentionBackend())
    assert_close(got, want, torch.bfloat16)


def test_decode_replays_in_cuda_graph():
    """write_kv + forward capture in a CUDA graph (no host sync, no host-side branching on
    device data) and replay correctly after the metadata tensors change in place."""
    spans = [(40, 1), (70, 1), (5, 1), (1500, 1)]  # 1500 keys: the heuristic splits
    case = make_case(spans, 16, 4, 64, 16, torch.bfloat16, device="cuda", extra_pages=3)
    backend = TritonAttentionBackend()
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = torch.empty_like(case.query)

    def step():
        backend.write_kv(case.key, case.value, k_cache, v_cache, case.meta.slot_mapping)
        backend.forward(case.query, k_cache, v_cache, case.meta, case.scale, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    # Next step of the same sequences: one more cached token each, new query/K/V values.
    nxt = make_case([(c + 1, q) for c, q in spans], 16, 4, 64, 16, torch.bfloat16,
                    device="cuda", extra_pages=3, seed=1)
    assert nxt.meta.block_tables.shape == case.meta.block_tables.shape
    for name in ("slot_mapping", "query_start_loc", "seq_lens"):
        getattr(case.meta, name).copy_(getattr(nxt.meta, name))
    case.meta.block_tables.copy_(nxt.meta.block_tables)
    case.query.copy_(nxt.query)
    case.key.copy_(nxt.key)
    case.value.copy_(nxt.value)
    k_cache.copy_(nxt.k_cache)
    v_cache.copy_(nxt.v_cache)
    graph.replay()
    torch.cuda.synchronize()
    _, want = run_both(nxt, backend)
    assert_close(out, want, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_verify_rows_do_not_depend_on_where_the_window_starts(dtype):
    """A query at position p gives the same output bit for bit whether it sits first, in the
    middle or last of a k+1-token verify window: key tiles sit at fixed absolute positions,
    split boundaries depend on the sequence length only through a power of two (the same for
    every window here) and on the split count, which for verify spans comes from the batch
    alone, and tiles past a row are exact no-ops. Speculation's
    numerics then depend only on positions, not on what was accepted before (W-SPEC's
    calibration relies on it). Not checkable on CPU: numpy's matmul rounds a row differently
    depending on its place in the tile."""
    from llmbatch.runtime.attention.backend import AttentionMetadata

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, hd, bs, n = 32, 8, 64, 16, 1024
    k_cache = torch.randn(n // bs, bs, kv_heads, hd, generator=g).to(dtype).cuda()
    v_cache = torch.randn(n // bs, bs, kv_heads, hd, generator=g).to(dtype).cuda()
    queries = torch.randn(n, heads, hd, generator=g).to(dtype).cuda()  # one per position
    table = torch.arange(n // bs, dtype=torch.int32, device="cuda")[None, :]
    backend = TritonAttentionBackend()

    def window(start, length):
        seq_len = start + length
        meta = AttentionMetadata(
            torch.arange(start, seq_len, device="cuda"),
            torch.tensor([0, length], dtype=torch.int32, device="cuda"),
            torch.tensor([seq_len], dtype=torch.int32, device="cuda"), table, length, seq_len,
            [0, length], [seq_len])
        return backend.forward(queries[start:seq_len].contiguous(), k_cache, v_cache, meta,
                               hd ** -0.5)

    rows: dict[int, list] = {}
    # Windows of 5 overlapping positions 904.., and windows whose sequence length crosses 256
    # keys (250..256: before stop 10 the split count of such eager steps changed there).
    for start in (900, 902, 904, 906, 248, 250, 251, 252):
        out = window(start, 5)
        for j in range(5):
            rows.setdefault(start + j, []).append(out[j])
    compared = 0
    for pos, outs in rows.items():
        for other in outs[1:]:
            assert torch.equal(outs[0], other), pos
            compared += 1
    assert compared == 20


@pytest.mark.parametrize("num_splits", [16, 32])
def test_fused_split_reduce_equals_the_second_launch_cuda(num_splits):
    """The split-KV merge done by each tile's last split (acq_rel counter, .cg loads) gives
    the two-launch reduce's output to fp32 rounding on real concurrent programs, eagerly
    twice and in a CUDA graph replayed twice, and every counter is back at zero after each
    (a graph replays on the counters it captured; one left non-zero would skip a merge)."""
    spans = [(3000, 1), (700, 1), (17, 1), (1200, 1), (0, 1), (2047, 1)]
    case = make_case(spans, 32, 8, 64, 16, torch.float32, device="cuda", seed=5)
    unfused, want = run_both(case, TritonAttentionBackend(num_kv_splits=num_splits))
    assert_close(unfused, want, torch.float32)
    backend = TritonAttentionBackend(num_kv_splits=num_splits, fused_split_reduce=True)

    def counters_zero():
        kept = backend._split_counters[torch.device("cuda", torch.cuda.current_device())]
        return all(int(c.abs().sum()) == 0 for c in kept)

    for _ in range(2):
        fused, _ = run_both(case, backend)
        torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-6)
        assert counters_zero()
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    backend.write_kv(case.key, case.value, k_cache, v_cache, case.meta.slot_mapping)
    out = torch.full_like(case.query, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(case.query, k_cache, v_cache, case.meta, case.scale, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.forward(case.query, k_cache, v_cache, case.meta, case.scale, out=out)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, unfused, atol=1e-6, rtol=1e-6)
        assert counters_zero()
