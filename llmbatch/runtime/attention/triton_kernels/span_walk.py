"""The key walk shared by the paged attention kernels (paged_attention.py's, and
rotary_decode.py's, which builds its q rows itself): which span a query-tile program serves,
its rows, and the online-softmax walk over its split's key tiles with the output or split
partials stored. paged_attention.py's docstring describes the work decomposition."""

from __future__ import annotations

import triton
import triton.language as tl

from llmbatch.runtime.attention.triton_kernels.split_reduce import merge_split_rows

# Softmax runs in base 2: exp(x * scale) == exp2(x * scale * log2(e)).
LOG2E = 1.4426950408889634
# A finite stand-in for -inf as the initial running max: keeps exp2(m_old - m_new) finite for
# rows that have seen no visible key yet (exp2(-inf - -inf) would be NaN).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def find_seq_idx(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
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
def split_tiles(seq_tiles, NUM_SPLITS: tl.constexpr):
    """Key tiles per split: the power of two >= cdiv(seq_tiles, NUM_SPLITS) (see paged_attention.py's
    docstring; NUM_SPLITS * result >= seq_tiles, so the splits cover every tile)."""
    need = tl.cdiv(seq_tiles, NUM_SPLITS)
    per: tl.int32 = 1
    while per < need:
        per = per * 2
    return per


@triton.jit
def attend_tile(
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
def program_span(query_start_loc_ptr, num_seqs, pid_q, BLOCK_Q: tl.constexpr):
    """(seq_idx, q_start, query_len, q_tile_start) of query-tile program pid_q: its span, the
    span's first row and length, and the tile's first token within the span (>= query_len for
    a spare program, which returns at once)."""
    seq_idx = find_seq_idx(query_start_loc_ptr, pid_q, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    query_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    q_tile_start = (pid_q - (q_start // BLOCK_Q + seq_idx)) * BLOCK_Q
    return seq_idx, q_start, query_len, q_tile_start


@triton.jit
def tile_rows(q_start, q_tile_start, query_len, ctx_len, kv_head, GROUP: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row m of the tile: token q_tile_start + m // GROUP of the span, query head
    kv_head * GROUP + m % GROUP. Returns (head, row_valid, q_pos, tok), each (BLOCK_M,):
    query head, row in use, absolute position of the row's token, its row in q (int64)."""
    offs_m = tl.arange(0, BLOCK_M)
    q_off = q_tile_start + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m // GROUP < BLOCK_Q) & (q_off < query_len)
    q_pos = ctx_len + q_off
    tok = (q_start + q_off).to(tl.int64)
    return head, row_valid, q_pos, tok


@triton.jit
def attend_rows(
    q, q_pos, tok, head, row_valid, offs_d, seq_idx, seq_len, ctx_len, q_tile_start,
    query_len, pid_q, kv_head, split,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, num_heads, scale_log2, stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
    stride_bt_seq, stride_bt_blk,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr, FUSED_REDUCE: tl.constexpr,
):
    """The tile's rows q (BLOCK_M, HEAD_DIM) attend over this split's keys; the output (or,
    split, the partial and its lse, merged here by the last split with FUSED_REDUCE) is
    stored. Shared by _paged_attention_kernel and rotary_decode.py's kernel, which differ only
    in where q comes from."""
    # Keys this tile can see: 0 .. position of its last valid token.
    kv_len = tl.minimum(seq_len, ctx_len + tl.minimum(q_tile_start + BLOCK_Q, query_len))
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_split = split_tiles(tl.cdiv(seq_len, TILE_N), NUM_SPLITS)
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
        m_i, l_i, acc = attend_tile(
            q, q_pos, m_i, l_i, acc, t, kv_len, bt_row, k_head, v_head, offs_d, scale_log2,
            stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, stride_bt_blk,
            BLOCK_SIZE, TILE_N, False, IEEE_DOT)
    for t in range(mid, tile_hi):
        m_i, l_i, acc = attend_tile(
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
