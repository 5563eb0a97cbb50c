"""The jit pieces of layers/gemv.py's one-row kernel: the x chunk through the RMSNorm
prologue, the output store through skinny_matmul's epilogue (or as float32 logits), and the
L2 prefetch of a program's weight slice. gemv.py's docstring says how they fit together."""

from __future__ import annotations

import triton
import triton.language as tl

from llmbatch.runtime.layers.skinny_matmul import _epilogue_store, _rms_normed


@triton.jit
def store_row(acc, acc_up, cols, col_mask, bias_ptr, res_ptr, out_ptr, N,
              HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr):
    """acc (BLOCK_N,) fp32 = x @ W^T for output columns `cols` (acc_up: the up half) through
    skinny_matmul's epilogue as a one-row tile, so both kernels round step by step alike."""
    row = tl.arange(0, 1)
    _epilogue_store(acc[None, :], acc_up[None, :], row, cols, row < 1, col_mask, bias_ptr,
                    res_ptr, out_ptr, N, 0, 0, HAS_BIAS, RESIDUAL, GATE_UP)


@triton.jit
def store_out(acc, acc_up, cols, col_mask, bias_ptr, res_ptr, out_ptr, w_ptr, N,
              HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr,
              F32_OUT: tl.constexpr):
    """The row's outputs `cols`: through store_row, or with F32_OUT (plain calls only: the LM
    head's logits) rounded to the weights' dtype as F.linear's output is, then stored as
    float32 -- the values of F.linear(...).float() without the upcast's extra launch."""
    if F32_OUT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, acc.to(w_ptr.dtype.element_ty).to(tl.float32), mask=col_mask)
    else:
        store_row(acc, acc_up, cols, col_mask, bias_ptr, res_ptr, out_ptr, N, HAS_BIAS,
                  RESIDUAL, GATE_UP)


@triton.jit
def first_tiles(w_rows, w_up_rows, col_mask, k_first, k_hi, GATE_UP: tl.constexpr):
    """PREFETCH_W's loads: the weight tile at columns k_first (BLOCK_K,) of rows w_rows
    (BLOCK_N, 1) -- with GATE_UP also the up rows' -- masked to k < k_hi (an empty last split:
    all masked). Returns (k mask, tile, up tile: the tile again unless GATE_UP)."""
    first_mask = k_first < k_hi
    w_first_mask = col_mask[:, None] & first_mask[None, :]
    w_first = tl.load(w_rows + k_first[None, :], mask=w_first_mask, other=0.0)
    w_up_first = w_first  # placeholder unless GATE_UP; both (BLOCK_N, BLOCK_K)
    if GATE_UP:
        w_up_first = tl.load(w_up_rows + k_first[None, :], mask=w_first_mask, other=0.0)
    return first_mask, w_first, w_up_first


@triton.jit
def x_chunk(x_ptr, norm_w_ptr, k, k_mask, rstd, NORM: tl.constexpr):
    """x's chunk at columns k (BLOCK_K,), through the RMSNorm prologue with NORM, as a float32
    (1, BLOCK_K) row to multiply a weight tile by. rstd: unused without NORM."""
    x = tl.load(x_ptr + k, mask=k_mask, other=0.0)
    if NORM:
        nw = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        x = _rms_normed(x, rstd, nw)
    return x.to(tl.float32)[None, :]


@triton.jit
def prefetch_l2_slice(w_ptr, N, K, k_lo, k_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GATE_UP: tl.constexpr):
    """Ask L2 for every 128-byte line of this program's weight slice: rows
    [pid*BLOCK_N, (pid+1)*BLOCK_N) below N (with GATE_UP also those rows + N, the up half) x
    columns [k_lo, k_hi). One prefetch a line: a row of K-contiguous elements is K * size / 128
    lines (2048 bf16: 32). Rows that do not start on a line (K * size not a multiple of 128;
    never at model sizes) may miss their last line: it stays a demand miss, no harm.

    `prefetch.global.L2`, not `.L2::evict_last` (PTX 7.4, sm_80+; the plain form is PTX 2.0):
    every weight is read exactly once a decode step and a step streams far more weight than L2
    holds, so giving these lines the evict-last priority would only push the activations and
    the KV cache out of L2 ahead of them; normal priority is what the demand load would set.

    Layout: a 1-D tensor of ROWS * LINES (row, line) pairs a chunk, ROWS * LINES /
    (32 * num_warps) a thread (16 x 512 bf16 at 4 warps, or gate_up's 2 x 16 rows at 8: one a
    thread), so no two threads prefetch the same line (with fewer pairs than threads, as in
    tiny test configs and stop 19's 8 x 512 qkv tile, 64 pairs for 128 threads, Triton
    replicates pairs: each line is requested twice, no harm). ptxas (sm_90) unrolls the chunk
    loop 4x into CCTL.E.PF2, all before ACQBULK; registers as without it (stop 17's 16 x 512
    table: 1B qkv 128, 142 with PREFETCH_W; o_proj / down 122; gate_up 128). The asm has an unused
    int32 output (the elementwise op needs one); is_pure=False marks it as having side effects,
    so it is not dead code. Masked-off pairs skip the instruction under a predicate: no
    address outside W."""
    LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements a line
    LINES: tl.constexpr = BLOCK_K // LINE if BLOCK_K >= LINE else 1         # a row, a chunk
    CHUNK: tl.constexpr = LINES * LINE                                      # >= BLOCK_K
    ROWS: tl.constexpr = 2 * BLOCK_N if GATE_UP else BLOCK_N
    pair = tl.arange(0, ROWS * LINES)                                       # (ROWS * LINES,)
    r = pair // LINES
    col = tl.program_id(0) * BLOCK_N + r % BLOCK_N
    row_ok = col < N
    w_row = col + (r >= BLOCK_N).to(tl.int32) * N                           # up rows: + N
    line_ptrs = w_ptr + w_row.to(tl.int64) * K + (pair % LINES) * LINE      # (ROWS * LINES,)
    for k0 in range(k_lo, k_hi, CHUNK):
        on = row_ok & ((k0 + (pair % LINES) * LINE) < k_hi)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; }\n"
            "mov.u32 $0, 0;",
            "=r,l,r", [line_ptrs + k0, on.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1)
