"""Paged attention over a batch of variable-length query spans: one kernel family for all.

A decode token, a prompt chunk after a prefix-cache hit and k+1 speculative tokens are the same
thing here: span i holds the LAST query_len_i positions of a sequence of seq_lens[i] tokens and
attends causally (bottom-right aligned) to every earlier position, cached prefix included.

Work decomposition
------------------
Grid = (num_q_tiles, num_kv_heads, num_splits).

* A program owns BLOCK_Q consecutive query tokens of ONE span and ALL `group` query heads that
  share one KV head, laid out as BLOCK_M = BLOCK_Q * group (padded) rows of a single tile:
      row m -> token q_tile_start + m // group, query head kv_head * group + m % group.
  Each K/V page is therefore loaded once per group (GQA), and decode (BLOCK_Q small) still
  gives tl.dot the >= 16 rows it needs.
* Query tiles are numbered without a host sync: span i's tiles start at
  query_start_loc[i] // BLOCK_Q + i, so num_tokens // BLOCK_Q + num_seqs programs always
  suffice; each program binary-searches query_start_loc for its span, and programs past the
  end of their span return at once.
* The program walks the keys 0..(its last query position) in TILE_N-wide tiles, gathering each
  key's page through block_table (a tile may span several pages, or part of one), with an
  online softmax in fp32 (base 2: exp2 with scale * log2(e) folded in). Tiles wholly below
  the causal diagonal (all of a prefill tile's history, all but the last tile of a decode) run
  a variant with no load masks and no score masking.
* Split-KV (flash-decoding): with num_splits > 1, split s takes key tiles
  [s * P, (s + 1) * P) and writes a normalised partial output plus its log-sum-exp (base 2) to
  fp32 scratch; `_reduce_splits_kernel` (split_reduce.py) merges them in a second launch, or,
  with FUSED_REDUCE, the last program of each query tile to finish merges its rows. P is the
  power of two at or above cdiv(tiles of the whole sequence, num_splits): for one split count
  it depends on the sequence's length only through that power of two, so the rows of a
  k+1-token verify window get the same split boundaries wherever the window starts (unless it
  straddles a length where P doubles: 1024, 2048, ... keys at 16 splits of 64), and
  speculation's bf16 numerics do not drift with what was accepted before. The split count is
  the caller's: for verify spans triton_backend.py takes it from the batch alone. Correct for
  any num_splits and any sequence length, so a CUDA graph captured with one split count stays
  correct for every later step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmbatch.runtime import pdl
from llmbatch.runtime.attention.triton_kernels.span_walk import (LOG2E, attend_rows,
                                                                 program_span, tile_rows)
from llmbatch.runtime.attention.triton_kernels.split_reduce import _reduce_splits_kernel
from llmbatch.runtime.fp_fusion import FP_FUSION
from llmbatch.runtime.pdl import pdl_wait_then_release


@triton.jit
def _paged_attention_kernel(
    out_ptr,            # (num_tokens, num_heads, HEAD_DIM), query dtype; used if NUM_SPLITS == 1
    part_out_ptr,       # (num_tokens, num_heads, NUM_SPLITS, HEAD_DIM) fp32; if NUM_SPLITS > 1
    part_lse_ptr,       # (num_tokens, num_heads, NUM_SPLITS) fp32, base-2 log-sum-exp
    counter_ptr,        # (>= grid[0] * num_kv_heads,) int32, zero at rest; if FUSED_REDUCE
    q_ptr,              # (num_tokens, num_heads, HEAD_DIM)
    k_cache_ptr,        # (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    v_cache_ptr,
    block_tables_ptr,   # (num_seqs, max_blocks_per_seq) int32
    seq_lens_ptr,       # (num_seqs,)
    query_start_loc_ptr,  # (num_seqs + 1,)
    num_seqs,
    num_heads,
    scale_log2,         # softmax scale * log2(e)
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_slot, stride_k_head,
    stride_v_blk, stride_v_slot, stride_v_head,
    stride_bt_seq, stride_bt_blk,
    GROUP: tl.constexpr,        # query heads per KV head
    BLOCK_Q: tl.constexpr,      # query tokens per program; BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,      # rows of the query tile (power of two >= 16)
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,   # tokens per KV page
    TILE_N: tl.constexpr,       # keys per inner-loop step
    NUM_SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr,     # float32 inputs: exact fp32 dots, not TF32
    FUSED_REDUCE: tl.constexpr = False,   # NUM_SPLITS > 1: the last split merges (split_reduce)
    USE_PDL: tl.constexpr = False,        # programmatic dependent launch (runtime/pdl.py)
):
    if USE_PDL:
        pdl_wait_then_release()
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_idx, q_start, query_len, q_tile_start = program_span(
        query_start_loc_ptr, num_seqs, pid_q, BLOCK_Q)
    if q_tile_start >= query_len:
        return  # spare program past the end of its span (or an empty span)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    ctx_len = seq_len - query_len  # tokens before the span: cached prefix / earlier chunks
    head, row_valid, q_pos, tok = tile_rows(q_start, q_tile_start, query_len, ctx_len,
                                            kv_head, GROUP, BLOCK_Q, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
                + offs_d[None, :], mask=row_valid[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    attend_rows(q, q_pos, tok, head, row_valid, offs_d, seq_idx, seq_len, ctx_len,
                q_tile_start, query_len, pid_q, kv_head, split,
                out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, k_cache_ptr, v_cache_ptr,
                block_tables_ptr, num_heads, scale_log2, stride_o_tok, stride_o_head,
                stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot,
                stride_v_head, stride_bt_seq, stride_bt_blk,
                BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_SIZE, TILE_N, NUM_SPLITS, IEEE_DOT,
                FUSED_REDUCE)


def split_counter_slots(num_tokens: int, num_seqs: int, num_kv_heads: int, block_q: int) -> int:
    """Counters a fused-reduce launch needs: one per (query tile, KV head) program column."""
    return (num_tokens // block_q + num_seqs) * num_kv_heads


def paged_attention(
    out: torch.Tensor,          # (num_tokens, num_heads, head_dim), written in place
    query: torch.Tensor,        # (num_tokens, num_heads, head_dim)
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
    """Launch the kernel(s) with tile sizes chosen by the caller (see triton_backend.py).

    split_counters: with num_splits > 1, an int32 tensor of at least
    split_counter_slots(num_tokens, num_seqs, num_kv_heads, block_q) zeros: the splits are
    merged inside the kernel (split_reduce.py), no second launch; the kernel leaves it zero.
    Every size here comes from tensor shapes or caller ints: nothing reads the device, so the
    call is safe inside CUDA-graph capture.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return
    grid, part_out, part_lse, fused = launch_plan(out, query, k_cache, num_seqs, block_q,
                                                  num_splits, split_counters)
    _paged_attention_kernel[grid](
        out, part_out, part_lse, split_counters if fused else seq_lens,
        query, k_cache, v_cache,
        block_tables, seq_lens, query_start_loc,
        num_seqs, num_heads, scale * LOG2E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        GROUP=num_heads // num_kv_heads, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], TILE_N=tile_n, NUM_SPLITS=num_splits,
        IEEE_DOT=query.dtype == torch.float32, FUSED_REDUCE=fused,
        num_warps=num_warps, num_stages=num_stages, **FP_FUSION,
        **pdl.launch_kwargs(query.device),
    )
    if num_splits > 1 and not fused:
        reduce_splits(out, part_out, part_lse)


def launch_plan(out, query, k_cache, num_seqs: int, block_q: int, num_splits: int,
                split_counters):
    """(grid, part_out, part_lse, fused) of an attention launch over query's rows: the grid
    (query tiles, KV heads, splits), the fp32 split partials (out itself, unused, when
    unsplit), and whether the splits merge in the kernel (split_counters given, checked)."""
    num_tokens, num_heads, head_dim = query.shape
    if num_splits > 1:
        part_out = torch.empty((num_tokens, num_heads, num_splits, head_dim),
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_tokens, num_heads, num_splits),
                               dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused by the NUM_SPLITS == 1 specialisation
    grid = (num_tokens // block_q + num_seqs, k_cache.shape[2], num_splits)
    fused = num_splits > 1 and split_counters is not None
    if fused and split_counters.numel() < grid[0] * grid[1]:
        raise ValueError(f"split_counters holds {split_counters.numel()} slots, the launch "
                         f"needs {grid[0] * grid[1]}")
    return grid, part_out, part_lse, fused


def reduce_splits(out, part_out, part_lse) -> None:
    """The second launch of an unfused split: merge part_out / part_lse into out."""
    num_tokens, num_heads, num_splits, head_dim = part_out.shape
    _reduce_splits_kernel[(num_tokens, num_heads)](
        out, part_out, part_lse, num_heads, out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, num_warps=1 if head_dim <= 64 else 2, **FP_FUSION,
        **pdl.launch_kwargs(out.device),
    )
