"""Merging split-KV partials (paged_attention.py's flash-decoding path) into the output.

Each split s of a (token, head) row leaves a normalised partial output o_s (fp32) and its
base-2 log-sum-exp lse_s; the row's output is sum_s w_s * o_s / sum_s w_s with
w_s = 2^(lse_s - max_s lse_s). Empty splits (past a short sequence's end) carry lse = -inf and
weight 0. Two ways to run it:

* `_reduce_splits_kernel`: a second launch, one program per (token, head) row (the default).
* `merge_split_rows`: called inside the attention kernel by the LAST of a query tile's
  NUM_SPLITS programs to finish (EngineConfig-free switch: TritonAttentionBackend's
  fused_split_reduce, opt-in until measured). A per-(query tile, KV head) counter, bumped
  with an acq_rel atomic after a barrier, tells each program whether it is last; the last one
  merges its tile's rows and resets the counter to 0 for the next launch. One launch fewer per
  layer (16 per batch-1 step on the 1B shape). The two ways sum the splits in different orders
  (a tree there, a fixed loop here): results agree to fp32 rounding, each deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmbatch.runtime.pdl import pdl_wait_then_release


@triton.jit
def _reduce_splits_kernel(
    out_ptr,            # (num_tokens, num_heads, HEAD_DIM), query dtype
    part_out_ptr,       # (num_tokens, num_heads, NUM_SPLITS, HEAD_DIM) fp32
    part_lse_ptr,       # (num_tokens, num_heads, NUM_SPLITS) fp32
    num_heads,
    stride_o_tok, stride_o_head,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,   # next power of two >= NUM_SPLITS
    HEAD_DIM: tl.constexpr,
    USE_PDL: tl.constexpr = False,   # programmatic dependent launch (runtime/pdl.py)
):
    """out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse): one program per row."""
    if USE_PDL:
        pdl_wait_then_release()
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < NUM_SPLITS
    base = (tok * num_heads + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no keys at all: weights 0
    w = tl.exp2(lse - lse_max)                                   # (SPLITS_PAD,)
    o = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_valid[:, None], other=0.0)                # (SPLITS_PAD, HEAD_DIM)
    # Empty splits hold o == 0 and w == 0; the where guards 0 * garbage from ever mattering.
    o = tl.where((w > 0.0)[:, None], o, 0.0)
    denom = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
             out.to(out_ptr.dtype.element_ty))


@triton.jit
def merge_split_rows(out_ptr, part_out_ptr, part_lse_ptr, tok, head, row_valid, offs_d,
                     num_heads, stride_o_tok, stride_o_head,
                     NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge every split of the rows (tok, head) (BLOCK_M each; row_valid masks padding) into
    out. Reads the partials with .cg (L2, not this SM's L1: other programs wrote them)."""
    base = (tok * num_heads + head) * NUM_SPLITS                  # (BLOCK_M,) int64
    lse_max = tl.load(part_lse_ptr + base, mask=row_valid, other=float("-inf"),
                      cache_modifier=".cg")
    for s in tl.static_range(1, NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + base + s, mask=row_valid,
                                              other=float("-inf"), cache_modifier=".cg"))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)   # no keys at all: weights 0
    acc = tl.zeros([base.shape[0], HEAD_DIM], dtype=tl.float32)
    denom = tl.zeros([base.shape[0]], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(part_lse_ptr + base + s, mask=row_valid, other=float("-inf"),
                            cache_modifier=".cg") - lse_max)
        o = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_valid[:, None], other=0.0, cache_modifier=".cg")
        acc += tl.where((w > 0.0)[:, None], o, 0.0) * w[:, None]
        denom += w
    out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
