"""layers/gemv.py's kernel for 2..GEMV_MAX_ROWS rows (speculative verify steps: k + 1 tokens at
batch 1), launched by gemv_linear when x has more than one row.

    y[M, N] = prologue(x)[M, K] @ W[N, K]^T (+ bias[N]), then an optional epilogue

Small-M matmuls are memory-bound: W is the traffic, x is a few KB. So a program loads each
weight tile (BLOCK_N, BLOCK_K) ONCE and multiplies it with every row of x; M rows cost about
one row's weight stream. Rows are padded to ROWS, a power of two (M = 5 runs ROWS = 8): x rows
at and beyond M load as zeros, and their outputs are never stored.

Registers: the one-row kernel keeps a (BLOCK_N, BLOCK_K) float32 accumulator (64 a thread at
16 x 512 and 4 warps); ROWS of those would be 512 at ROWS = 8. Here each thread first adds its
VEC products along K (VEC = one 16-byte vector of weights, 8 in bf16: the tile is viewed as
(BLOCK_N, BLOCK_K // VEC, VEC) and summed over the last axis, in-thread, no shuffles), so a row
keeps a (BLOCK_N, BLOCK_K // VEC) float32 accumulator: ROWS x 8 a thread at 16 x 512.

Summation order, per row: the VEC products of a vector are added first, then those sums across
the K chunks, then across BLOCK_K // VEC at the end. The one-row kernel adds each column's
products across the chunks first and reduces all BLOCK_K columns at the end: another order, so
a row here equals gemv_linear of that row alone to float32 rounding, NOT bitwise (M = 1 never
comes here: it keeps the one-row kernel and its bits). Within this kernel no term of a row
depends on the other rows' values, but its tile (pick_config's rows) and ROWS may change the
order Triton reduces in, so M = 2 and M = 5 calls are not promised bitwise alike either.

ptxas sm_90 (bench.compile_kernels, bf16, the 1B shapes at pick_config(..., rows)'s 8 x 512
tile and 8 warps; no spills anywhere): ROWS 2 / 4 / 8 take 48 / 60 / 80 registers on qkv
(norm), 48 / 57 / 64 on o_proj and down (residual), 72 / 80 / 96 on gate_up, 48 / 57 / 74 on
the LM head; with PREFETCH_W up to 58 / 73 / 125 (qkv), 48 / 64 / 101 (o_proj, down) and
80 / 128 / 164 (gate_up). The table's one-row 16 x 512 tile at ROWS = 8 took 233 (o_proj, 4
warps) and spilled on gate_up: hence that cap.

Same prologue (RMSNorm: every row its own rstd over all of K), epilogues (skinny_matmul's
_epilogue_store with row strides; float32 logits), split-K with arrival counters (workspace
(SPLIT_K, M, N_w)), PDL and the two weight prefetches as the one-row kernel; gemv.py's
docstring says why each exists.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmbatch.runtime.layers.gemv_parts import first_tiles, prefetch_l2_slice
from llmbatch.runtime.layers.skinny_matmul import _epilogue_store, _rms_normed, _split_k_range
from llmbatch.runtime.pdl import pdl_wait_then_release

GEMV_MAX_ROWS = 8  # rows a gemv_linear call takes; ROWS = next power of two of M


@triton.jit
def rows_chunk(x_rows, norm_w_ptr, k, row_mask, k_mask, rstd, NORM: tl.constexpr):
    """x's rows at columns k, (ROWS, BLOCK_K) float32, through the RMSNorm prologue with NORM
    (rstd (ROWS,): each row its own). Rows at and beyond M are zeros."""
    x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if NORM:
        nw = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        x = _rms_normed(x, rstd[:, None], nw[None, :])
    return x.to(tl.float32)


@triton.jit
def row_products(w, xf, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 VEC: tl.constexpr):
    """w (BLOCK_N, BLOCK_K) times every row of xf (ROWS, BLOCK_K), each VEC consecutive
    products along K added: (ROWS, BLOCK_N, BLOCK_K // VEC) float32."""
    w4 = tl.reshape(w.to(tl.float32), (1, BLOCK_N, BLOCK_K // VEC, VEC))
    x4 = tl.reshape(xf, (ROWS, 1, BLOCK_K // VEC, VEC))
    return tl.sum(w4 * x4, axis=3)


@triton.jit
def store_rows(acc, acc_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr, out_ptr, w_ptr,
               N, res_row_stride, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
               GATE_UP: tl.constexpr, F32_OUT: tl.constexpr):
    """acc (ROWS, BLOCK_N) fp32 = x @ W^T of columns `cols` -> out (M, N), row stride N:
    skinny_matmul's epilogue, or with F32_OUT the weights' dtype rounding stored as float32
    (gemv_parts.store_out's, a row at a time there)."""
    if F32_OUT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                 acc.to(w_ptr.dtype.element_ty).to(tl.float32),
                 mask=row_mask[:, None] & col_mask[None, :])
    else:
        _epilogue_store(acc, acc_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr,
                        out_ptr, N, res_row_stride, N, HAS_BIAS, RESIDUAL, GATE_UP)


@triton.jit
def _gemv_rows_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, x_row_stride, res_row_stride, k_per_split, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    GATE_UP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_W: tl.constexpr, PREFETCH_L2: tl.constexpr, F32_OUT: tl.constexpr,
):
    # Program (n, s): output columns [n*BLOCK_N, (n+1)*BLOCK_N) of all M rows, K range
    # [s*k_per_split, (s+1)*k_per_split) as in gemv.py's one-row kernel. ws: (SPLIT_K, M, N_w).
    VEC: tl.constexpr = min(BLOCK_K, 128 // w_ptr.dtype.element_ty.primitive_bitwidth)
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride       # (ROWS, 1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K                  # (BLOCK_N, 1)
    w_up_rows = w_ptr + (cols + N)[:, None].to(tl.int64) * K         # read only with GATE_UP
    k_lo, k_hi = _split_k_range(K, k_per_split, SPLIT_K)
    if PREFETCH_W:
        # The first weight tile(s) before the PDL wait (W is written by no kernel of a step);
        # the loop's first iteration is peeled onto them below.
        k_first = k_lo + offs_k
        first_mask, w_first, w_up_first = first_tiles(w_rows, w_up_rows, col_mask, k_first,
                                                      k_hi, GATE_UP)
    if PREFETCH_L2:
        prefetch_l2_slice(w_ptr, N, K, k_lo, k_hi, BLOCK_N, BLOCK_K, GATE_UP)
    if USE_PDL:
        pdl_wait_then_release()
    rstd = tl.zeros((ROWS,), dtype=tl.float32)  # placeholder unless NORM
    if NORM:
        # Each row's sum of squares over ALL of K, in every program (every split alike).
        sq = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xf = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & (k < K)[None, :],
                         other=0.0).to(tl.float32)
            sq += xf * xf
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)
    acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc_up = acc  # placeholder unless GATE_UP
    if GATE_UP:
        acc_up = tl.zeros((ROWS, BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    k_start = k_lo
    if PREFETCH_W:
        x_first = rows_chunk(x_rows, norm_w_ptr, k_first, row_mask, first_mask, rstd, NORM)
        acc += row_products(w_first, x_first, ROWS, BLOCK_N, BLOCK_K, VEC)
        if GATE_UP:
            acc_up += row_products(w_up_first, x_first, ROWS, BLOCK_N, BLOCK_K, VEC)
        k_start = k_lo + BLOCK_K
    for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + offs_k
        k_mask = k < K
        xf = rows_chunk(x_rows, norm_w_ptr, k, row_mask, k_mask, rstd, NORM)  # (ROWS, BLOCK_K)
        w_mask = col_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)    # (BLOCK_N, BLOCK_K)
        acc += row_products(w, xf, ROWS, BLOCK_N, BLOCK_K, VEC)
        if GATE_UP:
            w_up = tl.load(w_up_rows + k[None, :], mask=w_mask, other=0.0)
            acc_up += row_products(w_up, xf, ROWS, BLOCK_N, BLOCK_K, VEC)
    part = tl.sum(acc, axis=2)                                       # (ROWS, BLOCK_N)
    part_up = part  # placeholder unless GATE_UP
    if GATE_UP:
        part_up = tl.sum(acc_up, axis=2)
    if SPLIT_K == 1:
        store_rows(part, part_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr, out_ptr,
                   w_ptr, N, res_row_stride, HAS_BIAS, RESIDUAL, GATE_UP, F32_OUT)
    else:
        # Partial sums to ws[s, row, col] (up: col + N), then the arrival count; the last
        # program adds the splits in order 0..SPLIT_K-1 (deterministic) and re-arms the counter.
        n_w = 2 * N if GATE_UP else N
        part_mask = row_mask[:, None] & col_mask[None, :]
        ws_rows = ws_ptr + rows[:, None] * n_w + cols[None, :]       # (ROWS, BLOCK_N)
        tl.store(ws_rows + tl.program_id(1) * M * n_w, part, mask=part_mask)
        if GATE_UP:
            tl.store(ws_rows + tl.program_id(1) * M * n_w + N, part_up, mask=part_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            total_up = total
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_rows + s * M * n_w, mask=part_mask, other=0.0,
                                 cache_modifier=".cg")
                if GATE_UP:
                    total_up += tl.load(ws_rows + s * M * n_w + N, mask=part_mask, other=0.0,
                                        cache_modifier=".cg")
            store_rows(total, total_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr,
                       out_ptr, w_ptr, N, res_row_stride, HAS_BIAS, RESIDUAL, GATE_UP, F32_OUT)
            tl.atomic_xchg(count_ptr + pid, 0)  # re-armed for the next call / graph replay


def rows_of(m: int) -> int:
    """ROWS for an M-row call: M padded to a power of two."""
    return triton.next_power_of_2(m)
