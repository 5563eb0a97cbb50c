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
from llmbatch.runtime.attention.triton_kernels.split_reduce import (_reduce_splits_kernel,
                                                                   merge_split_rows)
from llmbatch.runtime.pdl import pdl_wait_then_release

# Softmax runs in base 2: exp(x * scale) == exp2(x * scale * log2(e)).
LOG2E = 1.4426950408889634
# A finite stand-in for -inf as the initial running max: keeps exp2(m_old - m_new) finite for
# rows that have seen no visible key yet (exp2(-inf - -inf) would be NaN).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_seq_idx(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i in [0, num_seqs) with query_start_loc[i] // BLOCK_Q + i <= pid."""
    # Annotated so the loop-carried values are int32 tensors from the start (an int literal,
    # or num_seqs == 1 specialised to a constant, would otherwise be a constexpr).
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = first_tile <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _split_tiles(seq_tiles, NUM_SPLITS: tl.constexpr):
    """Key tiles per split: the power of two >= cdiv(seq_tiles, NUM_SPLITS) (see the module
    docstring; NUM_SPLITS * result >= seq_tiles, so the splits cover every tile)."""
    need = tl.cdiv(seq_tiles, NUM_SPLITS)
    per: tl.int32 = 1
    while per < need:
        per = per * 2
    return per


@triton.jit
def _attend_tile(
    q, q_pos, m_i, l_i, acc, t, kv_len, bt_row, k_head, v_head, offs_d, scale_log2,
    stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, stride_bt_blk,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """One online-softmax step over key tile t: keys t * TILE_N ... + TILE_N - 1.

    MASKED=False is only legal when every key of the tile is < kv_len and <= every row's
    position; then no load is masked and no score is hidden.
    """
    kpos = t * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,) absolute key positions
    k_valid = kpos < kv_len
    # Gather each key's page through the block table; a tile may cover several pages.
    if MASKED:
        page = tl.load(bt_row + (kpos // BLOCK_SIZE) * stride_bt_blk, mask=k_valid, other=0)
    else:
        page = tl.load(bt_row + (kpos // BLOCK_SIZE) * stride_bt_blk)
    page = page.to(tl.int64)
    in_page = kpos % BLOCK_SIZE
    # K is loaded transposed, (HEAD_DIM, TILE_N), so q @ k needs no tl.trans.
    k_ptrs = k_head + (page * stride_k_blk + in_page * stride_k_slot)[None, :] + offs_d[:, None]
    v_ptrs = v_head + (page * stride_v_blk + in_page * stride_v_slot)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=k_valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if IEEE_DOT:
        s = tl.dot(q, k.to(q.dtype), input_precision="ieee")
    else:
        s = tl.dot(q, k.to(q.dtype))
    s = s * scale_log2                                   # (BLOCK_M, TILE_N) fp32
    if MASKED:
        visible = (kpos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])                      # hidden keys -> exactly 0
    l_i = l_i * alpha + tl.sum(p, axis=1)

    if MASKED:
        v = tl.load(v_ptrs, mask=k_valid[:, None], other=0.0)  # (TILE_N, HEAD_DIM)
    else:
        v = tl.load(v_ptrs)
    if IEEE_DOT:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


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

    seq_idx = _find_seq_idx(query_start_loc_ptr, pid_q, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    query_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    q_tile_start = (pid_q - (q_start // BLOCK_Q + seq_idx)) * BLOCK_Q
    if q_tile_start >= query_len:
        return  # spare program past the end of its span (or an empty span)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    ctx_len = seq_len - query_len  # tokens before the span: cached prefix / earlier chunks

    # Row m of the tile: token q_tile_start + m // GROUP of the span, query head
    # kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = q_tile_start + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m // GROUP < BLOCK_Q) & (q_off < query_len)
    q_pos = ctx_len + q_off  # absolute position of each row's token
    tok = (q_start + q_off).to(tl.int64)

    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
                + offs_d[None, :], mask=row_valid[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)

    # Keys this tile can see: 0 .. position of its last valid token.
    kv_len = tl.minimum(seq_len, ctx_len + tl.minimum(q_tile_start + BLOCK_Q, query_len))
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_split = _split_tiles(tl.cdiv(seq_len, TILE_N), NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)   # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)            # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of p @ V
    bt_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt_seq
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_v_head

    # Tiles that end at or before the tile's FIRST query position are visible to every row and
    # lie inside the sequence: walk those without masks, then the diagonal/tail tiles with them.
    num_full = (ctx_len + q_tile_start + 1) // TILE_N
    mid = tl.minimum(tl.maximum(tile_lo, num_full), tile_hi)
    for t in range(tile_lo, mid):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, t, kv_len, bt_row, k_head, v_head, offs_d, scale_log2,
            stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, stride_bt_blk,
            BLOCK_SIZE, TILE_N, False, IEEE_DOT)
    for t in range(mid, tile_hi):
        m_i, l_i, acc = _attend_tile(
            q, q_pos, m_i, l_i, acc, t, kv_len, bt_row, k_head, v_head, offs_d, scale_log2,
            stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, stride_bt_blk,
            BLOCK_SIZE, TILE_N, True, IEEE_DOT)

    # l_i == 0 only for a split that saw no visible key (or malformed metadata): emit zeros
    # rather than NaN, and an lse of -inf so the reduction gives that split zero weight.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head
                 + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part_row = (tok * num_heads + head) * NUM_SPLITS + split  # (BLOCK_M,) int64
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_valid[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
        if FUSED_REDUCE:
            # Every thread's stores above precede (barrier) the release of the count; the
            # program that brings it to NUM_SPLITS has acquired all the others' partials.
            tl.debug_barrier()
            slot = counter_ptr + pid_q * tl.num_programs(1) + kv_head
            if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                merge_split_rows(out_ptr, part_out_ptr, part_lse_ptr, tok, head, row_valid,
                                 offs_d, num_heads, stride_o_tok, stride_o_head, NUM_SPLITS,
                                 HEAD_DIM)
                tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")   # ready for the next launch


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
    group = num_heads // num_kv_heads
    if num_tokens == 0 or num_seqs == 0:
        return
    if num_splits > 1:
        part_out = torch.empty((num_tokens, num_heads, num_splits, head_dim),
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_tokens, num_heads, num_splits),
                               dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused by the NUM_SPLITS == 1 specialisation
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    fused = num_splits > 1 and split_counters is not None
    if fused and split_counters.numel() < grid[0] * grid[1]:
        raise ValueError(f"split_counters holds {split_counters.numel()} slots, the launch "
                         f"needs {grid[0] * grid[1]}")
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
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], TILE_N=tile_n, NUM_SPLITS=num_splits,
        IEEE_DOT=query.dtype == torch.float32, FUSED_REDUCE=fused,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs(query.device),
    )
    if num_splits > 1 and not fused:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_lse, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, num_warps=1 if head_dim <= 64 else 2,
            **pdl.launch_kwargs(query.device),
        )
