"""Decode attention with the rotary embedding and the K/V store fused in: one launch a layer
where the unfused decode path takes two (layers/fused_rotary.py's rotary + store, then
paged_attention.py's kernel). EngineConfig.rotary_in_attention (auto, on where the triton
backend and the fused rotary are, since stop 19), TritonAttentionBackend.rotary_in_attention.

Why: at batch 1 the rotary + store launch is 2.3 us a layer of pure latency on an H200 (stop
17's profile: 37 us of a ~1 ms token on the 1B shape), plus a kernel boundary. Measured in
stop 19 on an H200: W-BATCH1 TPOT 0.96 vs 0.97 ms (1.02x), W-RANDOM 1.07x, W-PREFIX 1.00x
(bench --prev-defaults is the A/B row now; bench_batch1's row turns it off).

For steps whose every span is ONE query tile of the launch (query_len <= BLOCK_Q) of at most
8 tokens (TritonAttentionBackend.rotary_in_attention_fits: decode, and speculative verify's
k + 1 tokens; spans > 1 token UNMEASURED on a GPU). The grid, tiles and split-KV walk are
paged_attention.py's (attend_rows), and each program first builds its q rows itself:

* q: the program's rows (token x GROUP query heads), read from the unrotated q (a view of the
  qkv output), each rotated with its token's cos/sin (rotate-half), rounded to q's dtype step
  by step as RotaryEmbedding.rotate / fused_rotary do.
* K/V: a span's program (query tile, KV head, split) rotates and stores the key, and the
  value, of every token of its span whose key position ctx_len + i lies in ITS split's key
  range (all of them unsplit), at the token's slot (a negative slot, CUDA-graph padding,
  stores nothing), then passes a barrier (bar.sync: every thread's global stores are visible
  to the CTA's later loads) before it walks its keys, which read them back like any cached
  key; keys of later tokens of the span are hidden from earlier rows by position, as in
  attend_rows for any span.

No race across programs: a program reads only its own sequence's keys in its split's range,
for its KV head. The new ones among them are its span's tokens in that range: it stored them
itself. Each (token, KV head) is stored by exactly one program: the span has one tile with
rows (spans start at tile boundaries: span i's tiles start at query_start_loc[i] // BLOCK_Q
+ i, and BLOCK_Q >= query_len, so a second tile of the span, where the offset makes one, is a
spare program that returns at once), and one split's range holds each position. A span of
two tiles would break this (the second tile's rows read keys the first tile's program
stores), hence the one-tile limit. (CUDA-graph padding rows, slot -1 and a block-table row
of zeros, may read block 0 while a real row stores there; their outputs are discarded.)

So the result equals fused_rotary_store_kv followed by paged_attention bit for bit wherever
both round alike: always in the interpreter (the tests), and on a GPU up to the kernel's
compile flag: it is compiled with enable_fp_fusion=False (the rotary's torch roundings need
it, fused_rotary.py says why), so the softmax's multiply-adds are not contracted into FMAs
as in paged_attention.py's kernel: float32 rounding differences in the attention, not in q,
K or V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmbatch.runtime import pdl
from llmbatch.runtime.attention.triton_kernels.paged_attention import launch_plan, reduce_splits
from llmbatch.runtime.attention.triton_kernels.span_walk import (
    LOG2E, attend_rows, program_span, split_tiles, tile_rows)
from llmbatch.runtime.layers.fused_rotary import rotate_half
from llmbatch.runtime.pdl import pdl_wait_then_release


@triton.jit
def _rotary_decode_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,   # as _paged_attention_kernel
    q_ptr,              # (num_tokens, num_heads, HEAD_DIM), NOT yet rotated
    k_new_ptr,          # (num_tokens, num_kv_heads, HEAD_DIM), this step's keys, not rotated
    v_new_ptr,          # (num_tokens, num_kv_heads, HEAD_DIM), this step's values
    cos_ptr, sin_ptr,   # (num_tokens, 1, HEAD_DIM // 2), rows cs_tok apart
    slot_ptr,           # (num_tokens,) integer cache slots; negative: store nothing
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, num_heads, scale_log2,
    stride_q_tok, stride_q_head, stride_kn_tok, stride_kn_head, stride_vn_tok, stride_vn_head,
    stride_cs_tok,
    stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_slot, stride_k_head,
    stride_v_blk, stride_v_slot, stride_v_head,
    stride_bt_seq, stride_bt_blk,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr, FUSED_REDUCE: tl.constexpr,
    USE_PDL: tl.constexpr = False,   # programmatic dependent launch (runtime/pdl.py)
):
    if USE_PDL:
        pdl_wait_then_release()   # q, k, v come from the previous kernel (the qkv matmul)
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_idx, q_start, query_len, q_tile_start = program_span(
        query_start_loc_ptr, num_seqs, pid_q, BLOCK_Q)
    if q_tile_start >= query_len:
        return  # spare program past the end of its span (or an empty span)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    ctx_len = seq_len - query_len
    head, row_valid, q_pos, tok = tile_rows(q_start, q_tile_start, query_len, ctx_len,
                                            kv_head, GROUP, BLOCK_Q, BLOCK_M)

    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    first_half = offs_d < HALF
    partner = tl.where(first_half, offs_d + HALF, offs_d - HALF)
    cs_col = offs_d % HALF

    # q rows, rotated: (BLOCK_M, HEAD_DIM) in q's dtype, as fused_rotary would have stored them.
    rows = q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
    row_mask = row_valid[:, None]
    x = tl.load(rows + offs_d[None, :], mask=row_mask, other=0.0)
    x_partner = tl.load(rows + partner[None, :], mask=row_mask, other=0.0)
    cs = tok[:, None] * stride_cs_tok + cs_col[None, :]
    cos = tl.load(cos_ptr + cs, mask=row_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=row_mask, other=0.0).to(tl.float32)
    q = rotate_half(x, x_partner, cos, sin, first_half[None, :])

    # This step's K/V: the span is this tile (the caller checked query_len <= BLOCK_Q), so
    # its tokens are 0 .. query_len - 1 of the span. Each is rotated and stored by the one
    # split whose key range holds its position (all of them unsplit), the split that reads
    # it. Vectorized over BLOCK_Q lanes, lanes past the span masked; BLOCK_M lanes where
    # BLOCK_Q is no power of two (64 rows // group 6 = 10), which tl.arange needs. Not BLOCK_M
    # always: (BLOCK_M, HEAD_DIM) rotary operands spill at head_dim 128 (sm_90 ptxas, bf16,
    # group 8, 64 rows: 7.2 KB spilled against 1 KB with BLOCK_Q lanes).
    if (BLOCK_Q & (BLOCK_Q - 1)) == 0:
        offs_t = tl.arange(0, BLOCK_Q)
    else:
        offs_t = tl.arange(0, BLOCK_M)
    key_pos = ctx_len + offs_t                          # (lanes,) the tokens' key positions
    if NUM_SPLITS == 1:
        owner = offs_t < query_len
    else:
        owner = split == (key_pos // TILE_N) // split_tiles(tl.cdiv(seq_len, TILE_N),
                                                             NUM_SPLITS)
        owner = owner & (offs_t < query_len)
    t = (q_start + offs_t).to(tl.int64)                 # (lanes,) the tokens' rows
    slot = tl.load(slot_ptr + t, mask=owner, other=-1).to(tl.int64)
    store = (owner & (slot >= 0))[:, None]              # negative slot: store nothing
    k_rows = k_new_ptr + t[:, None] * stride_kn_tok + kv_head * stride_kn_head
    cs_t = t[:, None] * stride_cs_tok + cs_col[None, :]
    k = rotate_half(tl.load(k_rows + offs_d[None, :], mask=store, other=0.0),
                    tl.load(k_rows + partner[None, :], mask=store, other=0.0),
                    tl.load(cos_ptr + cs_t, mask=store, other=0.0).to(tl.float32),
                    tl.load(sin_ptr + cs_t, mask=store, other=0.0).to(tl.float32),
                    first_half[None, :])
    v = tl.load(v_new_ptr + t[:, None] * stride_vn_tok + kv_head * stride_vn_head
                + offs_d[None, :], mask=store, other=0.0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    tl.store(k_cache_ptr + (blk * stride_k_blk + off * stride_k_slot)[:, None]
             + kv_head * stride_k_head + offs_d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=store)
    tl.store(v_cache_ptr + (blk * stride_v_blk + off * stride_v_slot)[:, None]
             + kv_head * stride_v_head + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=store)
    # The stores above reach the loads of the key walk below, made by other threads of this
    # program: bar.sync orders them (CUDA: global writes before __syncthreads are visible to
    # the block after it). Every program passes it, so no thread waits on a skipped barrier.
    tl.debug_barrier()

    attend_rows(q, q_pos, tok, head, row_valid, offs_d, seq_idx, seq_len, ctx_len,
                q_tile_start, query_len, pid_q, kv_head, split,
                out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, k_cache_ptr, v_cache_ptr,
                block_tables_ptr, num_heads, scale_log2, stride_o_tok, stride_o_head,
                stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot,
                stride_v_head, stride_bt_seq, stride_bt_blk,
                BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE_N, NUM_SPLITS, IEEE_DOT,
                FUSED_REDUCE)


def rotary_decode_attention(
    out: torch.Tensor,          # (num_tokens, num_heads, head_dim), written in place
    query: torch.Tensor,        # (num_tokens, num_heads, head_dim), not rotated; rows strided
    key: torch.Tensor,          # (num_tokens, num_kv_heads, head_dim), not rotated
    value: torch.Tensor,        # (num_tokens, num_kv_heads, head_dim)
    cos: torch.Tensor,          # (num_tokens, 1, head_dim // 2), sin alike (one stride)
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # (num_tokens,) integer
    k_cache: torch.Tensor,      # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    block_q: int,
    block_m: int,
    tile_n: int,
    num_splits: int,
    num_warps: int = 4,
    num_stages: int = 2,
    split_counters: torch.Tensor | None = None,
) -> None:
    """paged_attention for spans whose query and key are not rotated yet: rotates them,
    stores the key and value into the caches at slot_mapping, attends. The caller
    (TritonAttentionBackend.forward_rotary_decode) checked the shapes and that every span
    fits one query tile, max_query_len <= block_q (the kernel assumes it). Launch sizes as
    paged_attention's."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    grid, part_out, part_lse, fused = launch_plan(out, query, k_cache, num_seqs, block_q,
                                                  num_splits, split_counters)
    _rotary_decode_kernel[grid](
        out, part_out, part_lse, split_counters if fused else seq_lens,
        query, key, value, cos, sin, slot_mapping,
        k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        num_seqs, num_heads, scale * LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), cos.stride(0),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        GROUP=num_heads // k_cache.shape[2], BLOCK_Q=block_q, BLOCK_M=block_m,
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], TILE_N=tile_n, NUM_SPLITS=num_splits,
        IEEE_DOT=query.dtype == torch.float32, FUSED_REDUCE=fused,
        num_warps=num_warps, num_stages=num_stages,
        # The rotary's roundings are torch's only without FMA contraction (fused_rotary.py).
        enable_fp_fusion=False, **pdl.launch_kwargs(query.device),
    )
    if num_splits > 1 and not fused:
        reduce_splits(out, part_out, part_lse)

