"""The one-launch decode attention (rotary + K/V store + attention,
triton_kernels/rotary_decode.py) compiled on CUDA against the two launches it replaces
(fused_rotary_store_kv, then forward). What only a GPU shows: that the owner split's K/V stores
reach its own key walk through the barrier (the interpreter runs a program's threads in
lockstep), and the launch inside a CUDA graph with PDL, as a decode graph runs it.

The caches must be bitwise equal (both rotate with the same roundings, FMA contraction off);
the outputs within float tolerance: this kernel is compiled with enable_fp_fusion=False, so
its softmax's multiply-adds round apart from paged_attention's contracted ones."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime import pdl  # noqa: E402
from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tests.runtime.test_rotary_decode_attention import (  # noqa: E402
    CASES, assert_bitwise, rotary_inputs, run_two_ways)
from tests.runtime.test_triton_attention import TOLERANCE, make_case  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]


def check(case, backend, heads, dtype, table=False):
    q, k, v, cos, sin = rotary_inputs(case, heads, dtype, table=table)
    (out1, kc1, vc1), (out2, kc2, vc2) = run_two_ways(case, backend, q, k, v, cos, sin)
    torch.cuda.synchronize()
    assert not torch.isnan(out1).any(), "an output element was left unwritten, or a NaN slot read"
    # The whole caches (NaN-poisoned empty slots compared equal): the new slots hold the same
    # rotated keys and values, and nothing was stored anywhere else.
    assert_bitwise((kc1, vc1), (kc2, vc2))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out1.float(), out2.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,spans,heads,kv_heads,head_dim,block_size,kwargs", CASES,
                         ids=[c[0] for c in CASES])
def test_equals_two_launches_cuda(name, spans, heads, kv_heads, head_dim, block_size, kwargs,
                                  dtype):
    case = make_case(spans, heads, kv_heads, head_dim, block_size, dtype, device="cuda")
    check(case, TritonAttentionBackend(**kwargs), heads, dtype, table=name.startswith("split"))


@pytest.mark.parametrize("span", [1, 5], ids=["decode", "verify-k4"])
@pytest.mark.parametrize("fused_reduce", [False, True], ids=["reduce-launch", "fused-reduce"])
@pytest.mark.parametrize("use_pdl", [False, True], ids=["no-pdl", "pdl"])
def test_batch1_1b_shape_in_a_cuda_graph(fused_reduce, use_pdl, span):
    """W-BATCH1's attention shape (32 heads, 8 KV heads, head_dim 64, 16-token pages) at 1000
    cached keys with the heuristic's splits, captured in a CUDA graph and replayed: equal to
    the two eager launches. With PDL on sm_90+, as the engine launches it. span 5: a W-SPEC
    verify step at batch 1 (k = 4; the one-launch path since stop 22) at positions 1022..1026,
    across key 1024: with 64-key tiles and 2 tiles a split (17 tiles over 16 splits) its keys
    fall in two splits, and each split's program must store its own."""
    if use_pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    dtype = torch.bfloat16
    case = make_case([(1000 if span == 1 else 1022, span)], 32, 8, 64, 16, dtype,
                     device="cuda")
    backend = TritonAttentionBackend(fused_split_reduce=fused_reduce)
    assert backend._num_splits(case.meta, 8, case.query.device) > 1
    q, k, v, cos, sin = rotary_inputs(case, 32, dtype)
    _, (want, kc_want, vc_want) = run_two_ways(case, backend, q, k, v, cos, sin)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    was = pdl.enabled()
    pdl.set_enabled(use_pdl)
    try:
        out = torch.full_like(want, float("nan"))
        backend.forward_rotary_decode(q, k, v, cos, sin, kc, vc, case.meta, case.scale,
                                      out=out)   # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            backend.forward_rotary_decode(q, k, v, cos, sin, kc, vc, case.meta, case.scale,
                                          out=out)
        out.fill_(float("nan"))
        # The eager call above already stored the new key and value: put the caches back
        # (NaN in the new slot) so the replay's own store is what its key walk reads.
        kc.copy_(case.k_cache)
        vc.copy_(case.v_cache)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        pdl.set_enabled(was)
    assert not torch.isnan(out).any(), "the replay read the new slot before storing it"
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert_bitwise((kc, vc), (kc_want, vc_want))
