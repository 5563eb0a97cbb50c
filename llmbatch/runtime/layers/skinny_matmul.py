"""Skinny matmul for decode steps of at most 16 tokens, with the neighbouring element-wise ops
fused in (W-BATCH1: batch-1 decode is weight-bandwidth bound and pays ~1.3 us of idle gap per
launch in the CUDA graph, so fewer launches that each stream their weight once are the lever).

    y[M, N] = prologue(x)[M, K] @ W[N, K]^T (+ bias[N]), then an optional epilogue;  M <= 16

    prologue  RMSNorm   x <- w_norm * round(x * rsqrt(mean(x^2) + eps))       (input_layernorm)
    epilogue  residual  out <- round(round(y) + residual)   written as the new residual stream
    epilogue  gate_up   W = [gate; up] (2I, K): out[M, I] <- silu(round(g)) * round(u)

One program owns BLOCK_N output columns for all M rows (BLOCK_M = 16 padded rows) and loops over
K in BLOCK_K chunks, so each weight element is read once and each output is written by exactly
one program: no atomics, deterministic. Batch invariance: the launcher picks the tile config from
(N, K, dtype) only, never from M, and a padded row is masked, not mixed in; so row r of an
M = 16 call is bitwise equal to the M = 1 call on row r (tests check it).

Split-K (SkinnyConfig.split_k = S > 1; off in the default table): when N / BLOCK_N programs are
too few to keep DRAM busy (down_proj: 128 programs streaming 256 KB each), program (n, s)
covers the s-th contiguous K range (whole BLOCK_K chunks) and stores raw fp32 partial sums to
a workspace (S, M, N_w); a second launch adds the S partials in fixed order and applies the
same epilogue. Still no atomics: deterministic and batch invariant; the RMSNorm prologue's
sum of squares is taken over all of K in every split.

pdl=True (EngineConfig.pdl, CUDA sm_90+ only): both kernels launch with programmatic dependent
launch and wait for the previous grid (griddepcontrol) before touching activations, so a
launch's setup overlaps the previous kernel's tail inside the decode CUDA graph.

Numerics copy the unfused path rounding step by rounding step (layers/norm.py, activation.py,
fused_kernels.py; F.linear rounds acc + bias once to the model dtype). The differences are the
float32 summation orders (sum of squares, dot products), as with any other GEMM.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests). Nothing here is on by default:
EngineConfig.skinny_matmul switches the model's fused decode path (models/llama_skinny.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime.fp_fusion import FP_FUSION
from llmbatch.runtime.pdl import pdl_wait_then_release
from llmbatch.runtime.layers.skinny_checks import (MAX_M, SUPPORTED_DTYPES,  # noqa: F401
                                                   check_inputs, skinny_matmul_supported)

MAX_SPLIT_K = 32  # the reduce kernel unrolls its loop over the splits
REDUCE_BLOCK_N = 64  # output columns per program of the split-K reduce kernel


@dataclass(frozen=True)
class SkinnyConfig:
    """One tile configuration. dot=True: tl.dot on (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N)
    tiles (tensor cores; needs BLOCK_M, BLOCK_N, BLOCK_K >= 16); dot=False: broadcast multiply
    and a float32 sum over K in registers (the classic GEMV; keep BLOCK_M * BLOCK_N * BLOCK_K
    small)."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = MAX_M
    dot: bool = True
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two, got {v}")
        if self.block_m < MAX_M:
            raise ValueError(f"SkinnyConfig.block_m must be >= {MAX_M} (one tile holds every "
                             f"row), got {self.block_m}")
        if self.dot and min(self.block_n, self.block_k) < 16:
            raise ValueError("SkinnyConfig with dot=True needs block_n and block_k >= 16")
        if (not isinstance(self.split_k, int) or isinstance(self.split_k, bool)
                or not 1 <= self.split_k <= MAX_SPLIT_K):
            raise ValueError(f"SkinnyConfig.split_k must be an int in 1..{MAX_SPLIT_K}, got "
                             f"{self.split_k!r}")


# UNTUNED defaults (no GPU in the session that wrote them): bench/bench_skinny_matmul.py sweeps
# alternatives on the GPU. Rows: (max N, max K, config), first match wins; N = output columns
# (I for gate_up). BLOCK_N 16 gives 128 programs for N = 2048 on a 132-SM H200, 512 for gate_up
# (two 16-row weight tiles each); a 16 x 256 bf16 tile is 8 KB, x 4 stages ~32 KB in flight per
# program, about what one SM needs to cover DRAM latency. The LM head (N = 128256) takes wider
# tiles: 2004 programs of 64 columns already fill the GPU many times.
_CONFIG_TABLE: tuple[tuple[int, int, SkinnyConfig], ...] = (
    (32768, 1 << 31, SkinnyConfig(block_n=16, block_k=256, num_warps=4, num_stages=4)),
    (1 << 31, 1 << 31, SkinnyConfig(block_n=64, block_k=128, num_warps=4, num_stages=3)),
)


def pick_config(n: int, k: int, dtype: torch.dtype) -> SkinnyConfig:
    """Tile config for N output columns, reduction length K; independent of M by design."""
    for max_n, max_k, cfg in _CONFIG_TABLE:
        if n <= max_n and k <= max_k:
            break
    if k < cfg.block_k:  # small K: one chunk, fewer masked lanes
        cfg = replace(cfg, block_k=max(16, triton.next_power_of_2(k)))
    if dtype == torch.float32:  # twice the bytes per tile: fewer stages fit in shared memory
        cfg = replace(cfg, num_stages=min(cfg.num_stages, 2))
    return cfg


@triton.jit
def _tile_dot(acc, x, w_t, DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 += x (BLOCK_M, BLOCK_K) @ w_t (BLOCK_K, BLOCK_N).

    w_t is loaded K-major straight from W's rows (no tl.trans in registers): a load that feeds
    tl.dot directly is what Triton's software pipeliner turns into multi-stage async copies."""
    if DOT:
        if IEEE_DOT:  # float32 weights: exact fp32 products, not TF32
            acc = tl.dot(x, w_t, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_t, acc)
    else:
        prod = x.to(tl.float32)[:, :, None] * w_t.to(tl.float32)[None, :, :]
        acc += tl.sum(prod, axis=1)
    return acc


@triton.jit
def _epilogue_store(acc, acc_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr, out_ptr, N,
                    res_row_stride, out_row_stride, HAS_BIAS: tl.constexpr,
                    RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 = x @ W^T for output columns `cols` (acc_up: the up half, used
    only with GATE_UP) -> bias, rounding, SiLU·mul, residual add -> out. Shared by the one-pass
    kernel and the split-K reduce kernel, so both round step by step alike."""
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # F.linear's output: acc + bias rounded once to the model dtype.
    y = acc.to(dtype)
    if GATE_UP:
        if HAS_BIAS:
            acc_up += tl.load(bias_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        up = acc_up.to(dtype).to(tl.float32)
        g = y.to(tl.float32)
        # fused_kernels.py's SiLU·mul: silu rounded to the dtype before the multiply.
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        y = (act * up).to(dtype)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if RESIDUAL:
        # norm.py's residual add: the rounded matmul output + residual, in the dtype.
        r = tl.load(res_ptr + rows[:, None].to(tl.int64) * res_row_stride + cols[None, :],
                    mask=out_mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_row_stride + cols[None, :], y,
             mask=out_mask)


@triton.jit
def _split_k_range(K, k_per_split, SPLIT_K: tl.constexpr):
    """[k_lo, k_hi) of this program's K range: all of K, or with SPLIT_K > 1 the
    program_id(1)-th range of k_per_split (whole BLOCK_K chunks; the last may be short or
    empty). Shared with layers/gemv.py."""
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    return k_lo, k_hi


@triton.jit
def _rms_normed(x, rstd, norm_w):
    """The RMSNorm prologue on a loaded chunk of x (model dtype), with rstd and the norm
    weight (fp32) broadcast to x's shape, rounded step by step as norm.py does: normalize in
    fp32, round to the model dtype, the weight multiply in fp32, round again. Shared with
    layers/gemv.py, so both kernels normalize alike."""
    normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
    return (normed * norm_w).to(x.dtype)


# M is not specialised: M = 1 and M = 16 run the same binary (one compile; and a row's
# instructions cannot differ with M, which batch invariance relies on).
@triton.jit(do_not_specialize=["M"])
def _skinny_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr, ws_ptr,
    M, N, K, x_row_stride, res_row_stride, out_row_stride, ws_row_stride, ws_split_stride,
    k_per_split, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program (n, s) owns output columns [n*BLOCK_N, (n+1)*BLOCK_N) of all M rows and, with
    # SPLIT_K > 1, the K range [s*k_per_split, (s+1)*k_per_split) (k_per_split a multiple of
    # BLOCK_K; the last range may be short or empty). W rows are K long (contiguous); with
    # GATE_UP the up half starts N rows further down.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride       # (BLOCK_M, 1)
    w_cols = w_ptr + cols[None, :].to(tl.int64) * K                  # (1, BLOCK_N)
    if USE_PDL:
        pdl_wait_then_release()
    if NORM:
        # First pass: each row's sum of squares over ALL of K, also in a split program (x is
        # M x K, small and L2-resident), so every split normalizes with the same rstd.
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xf = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & (k < K)[None, :],
                         other=0.0).to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
        rstd = tl.math.rsqrt(sum_sq / K + eps)                       # (BLOCK_M,)
    k_lo, k_hi = _split_k_range(K, k_per_split, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc  # placeholder unless GATE_UP
    if GATE_UP:
        w_up_cols = w_ptr + (cols + N)[None, :].to(tl.int64) * K
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            nw = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            x = _rms_normed(x, rstd[:, None], nw[None, :])
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_cols + k[:, None], mask=w_mask, other=0.0)     # (BLOCK_K, BLOCK_N)
        acc = _tile_dot(acc, x, w, DOT, IEEE_DOT)
        if GATE_UP:
            w_up = tl.load(w_up_cols + k[:, None], mask=w_mask, other=0.0)
            acc_up = _tile_dot(acc_up, x, w_up, DOT, IEEE_DOT)
    if SPLIT_K == 1:
        _epilogue_store(acc, acc_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr, out_ptr,
                        N, res_row_stride, out_row_stride, HAS_BIAS, RESIDUAL, GATE_UP)
    else:
        # Raw fp32 partial sums to ws[s, row, col] (gate) and ws[s, row, N + col] (up); the
        # reduce kernel adds them and applies the epilogue. An empty K range stores zeros.
        part = (ws_ptr + tl.program_id(1) * ws_split_stride
                + rows[:, None].to(tl.int64) * ws_row_stride + cols[None, :])
        part_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(part, acc, mask=part_mask)
        if GATE_UP:
            tl.store(part + N, acc_up, mask=part_mask)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(
    ws_ptr, bias_ptr, res_ptr, out_ptr, M, N, ws_row_stride, ws_split_stride, res_row_stride,
    out_row_stride, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    # ws (SPLIT_K, M, N or 2N) fp32 -> out (M, N). The splits are added in the fixed order
    # ((0 + p0) + p1) + ... per element: deterministic, and no term depends on M or on other
    # rows, so the split-K path keeps batch invariance.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    part = ws_ptr + rows[:, None].to(tl.int64) * ws_row_stride + cols[None, :]
    if USE_PDL:
        pdl_wait_then_release()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc  # placeholder unless GATE_UP
    if GATE_UP:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part + s * ws_split_stride, mask=mask, other=0.0)
        if GATE_UP:
            acc_up += tl.load(part + s * ws_split_stride + N, mask=mask, other=0.0)
    _epilogue_store(acc, acc_up, rows, cols, row_mask, col_mask, bias_ptr, res_ptr, out_ptr, N,
                    res_row_stride, out_row_stride, HAS_BIAS, RESIDUAL, GATE_UP)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  residual: Optional[torch.Tensor] = None, gate_up: bool = False,
                  config: Optional[SkinnyConfig] = None, pdl: bool = False) -> torch.Tensor:
    """x (M, K), 1 <= M <= 16, rows contiguous; weight (N_w, K) contiguous, same dtype;
    bias (N_w,); norm_weight (K,): RMSNorm prologue with eps; residual (M, N): returns the new
    residual round(round(x @ W^T + bias) + residual); gate_up: N_w = 2I, returns
    silu(gate) * up of shape (M, I). Otherwise returns x @ W^T + bias, (M, N_w).
    config overrides the tile table (the micro-benchmark's sweep); config.split_k > 1 runs the
    two-launch split-K path. pdl: launch with programmatic dependent launch (CUDA, sm_90+)."""
    n = check_inputs(x, weight, bias, norm_weight, residual, gate_up)
    if pdl and x.device.type != "cuda":
        raise ValueError(f"pdl=True needs CUDA tensors (programmatic dependent launch, sm_90+), "
                         f"got x on {x.device}")
    m, k = x.shape
    cfg = config or pick_config(n, k, x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = residual if residual is not None else out  # placeholder when RESIDUAL is off
    bias_arg = bias if bias is not None else weight
    flags = dict(HAS_BIAS=bias is not None, RESIDUAL=residual is not None, GATE_UP=gate_up,
                 USE_PDL=pdl)
    if pdl:  # launch option (not a kernel argument): lets this grid overlap the previous one
        flags["launch_pdl"] = True
    s = cfg.split_k
    # K range per split: whole BLOCK_K chunks, so only the last split sees the K tail.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), s) * cfg.block_k
    # Split-K partial sums (s, m, N_w) fp32; torch.empty per call: inside a CUDA graph capture
    # it comes from the graph's private pool, like every other activation.
    ws = (torch.empty((s, m, weight.shape[0]), dtype=torch.float32, device=x.device)
          if s > 1 else out)
    ws_row, ws_split = (ws.stride(1), ws.stride(0)) if s > 1 else (0, 0)
    _skinny_matmul_kernel[(triton.cdiv(n, cfg.block_n), s)](
        x, weight, bias_arg, norm_weight if norm_weight is not None else weight, res, out, ws,
        m, n, k, x.stride(0), res.stride(0), out.stride(0), ws_row, ws_split, k_per_split,
        float(eps), NORM=norm_weight is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, DOT=cfg.dot, IEEE_DOT=x.dtype == torch.float32, SPLIT_K=s,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **flags)
    if s > 1:
        _split_k_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK_N),)](
            ws, bias_arg, res, out, m, n, ws_row, ws_split, res.stride(0), out.stride(0),
            SPLIT_K=s, BLOCK_M=cfg.block_m, BLOCK_N=REDUCE_BLOCK_N, num_warps=4, **FP_FUSION,
            **flags)
    return out
