"""Weight-only int8 GEMM (w8a16) for bitsandbytes vector-wise int8 weights, in Triton.

    y[M, N] = x[M, K] @ (qweight[N, K] * qscale[N] / 127)^T  (+ bias[N])

x is float16 / bfloat16 / float32; qweight is the (out, in) row-major int8 weight and qscale
its float32 per-output-row absmax (layers/quantization.py, method int8). The weight is read
as int8 -- a quarter of float32's bytes, half of bf16's -- and each (BLOCK_K, BLOCK_N) tile is
converted to x's dtype inside the K loop, so no dequantized copy of the weight ever exists in
memory (the fallback path, F.linear of the dequantized weight, materialises one per call).

Numerics: int8 values (|q| <= 127) are exact in float16 and bfloat16, so tl.dot sees the exact
quantized weight; products are accumulated in float32. The scale is per output column of y,
hence it factors out of the K sum and is applied once to the float32 accumulator in the
epilogue, followed by the bias; the result is rounded to x's dtype once. float32 x uses
IEEE dots (no TF32), like the attention kernels' IEEE_DOT.

Batch invariance: a row's result depends only on that row and on the tile configuration, which
is chosen by M (_TILES). Calls whose M falls in the same bucket give bitwise identical rows;
calls in different buckets (e.g. M=1 vs M=100) use a different BLOCK_K (so another float32
summation grouping) and on GPU another MMA instruction, and agree only within rounding.
CUDA graph padding never crosses a bucket: the captured batch sizes include 16 and 64.

CUDA graphs: the launcher's host logic depends only on shapes, dtypes and strides (fixed for a
captured graph); it never syncs, reads device values or keeps temporaries between calls. The
output is a fresh torch.empty, which inside a capture comes from the graph's memory pool.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime.fp_fusion import FP_FUSION

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Tile(NamedTuple):
    """One launch configuration: tile sizes (all >= 16, tl.dot's minimum) and launch options."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest M, tile) ascending; the last entry takes every larger M. UNTUNED: chosen by reasoning
# about H100/H200 shapes, never measured (no GPU was available when this was written).
#   decode (M <= 16): one M tile; the kernel streams the weight, so narrow N tiles give more
#     programs (N=4096 -> 128) to spread the weight reads over the SMs, and a deep K tile keeps
#     more bytes in flight per program. Rows past M are masked (read as 0, never stored).
#   M <= 64 (wide decode, speculative verify, small prefill chunks): square-ish 64 tiles.
#   larger M (prefill): 128x128 tiles, compute bound; 8 warps.
_TILES = (
    (16, Tile(16, 32, 128, 4, 4)),
    (64, Tile(64, 64, 64, 4, 4)),
    (None, Tile(128, 128, 64, 8, 3)),
)
# Programs are grouped in runs of GROUP_M M-tiles sharing the same N-tiles, so consecutive
# programs reuse weight tiles from L2 during prefill (irrelevant when there is one M tile).
GROUP_M = 8


def tile_for(m: int, table=_TILES) -> Tile:
    """The launch configuration for an M-row call (M >= 1); `table` is a _TILES-like tuple
    (nf4_matmul.py passes its own)."""
    for max_m, tile in table:
        if max_m is None or m <= max_m:
            return tile
    raise AssertionError("unreachable: the last _TILES entry has no bound")


def all_tiles() -> tuple[Tile, ...]:
    """Every configuration the launcher may use (bench/compile_kernels.py compiles each)."""
    return tuple(tile for _, tile in _TILES)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program on a 1-D grid of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),
    grouped: GROUP_M M-tiles walk the N-tiles together (shared by nf4_matmul.py)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
                        M, N, K, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # 1-D grid over (M tiles x N tiles), grouped: GROUP_M M-tiles walk the N-tiles together.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # (BLOCK_M,) rows of x / y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # (BLOCK_N,) rows of qweight = cols of y
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # int64 row offsets: M * K and N * K may exceed 2**31 for big prefill chunks / weights.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    # The weight tile is loaded transposed, (BLOCK_K, BLOCK_N), so x @ w needs no tl.trans.
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        # Masked x rows / K columns read 0, so they add exactly nothing to the sum.
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        w = q.to(x.dtype)  # exact: |q| <= 127 fits every supported dtype's mantissa
        if IEEE_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # Epilogue: the per-output-row scale (absmax / 127) factors out of the K sum.
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0) / 127.0
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check_inputs(x, qweight, qscale, bias) -> None:
    """One-line ValueError/TypeError for anything the kernel cannot take as is."""
    for name, t in (("x", x), ("qweight", qweight), ("qscale", qscale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int8_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"int8_linear: x dtype {x.dtype} is not supported "
                         f"(use float16, bfloat16 or float32)")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8_linear: qweight must be a 2-D (out, in) int8 tensor, got "
                         f"{tuple(qweight.shape)} {qweight.dtype}")
    n, k = qweight.shape
    if n == 0 or k == 0:
        raise ValueError(f"int8_linear: qweight {tuple(qweight.shape)} is empty")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"int8_linear: x {tuple(x.shape)} must have last dim {k} "
                         f"(qweight is {tuple(qweight.shape)})")
    if qscale.dtype != torch.float32 or tuple(qscale.shape) != (n,):
        raise ValueError(f"int8_linear: qscale must be ({n},) float32, got "
                         f"{tuple(qscale.shape)} {qscale.dtype}")
    check_bias_and_layout("int8_linear", x, n, bias, [("qweight", qweight), ("qscale", qscale)])


def check_bias_and_layout(fn: str, x, n: int, bias, tensors) -> None:
    """Shared by the weight-only GEMM launchers (`fn` names the caller in the message): bias
    None or (n,) in x's dtype; x, bias and the named `tensors` contiguous on x's device."""
    tensors = [("x", x), *tensors]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got "
                            f"{type(bias).__name__}")
        if bias.dtype != x.dtype or tuple(bias.shape) != (n,):
            raise ValueError(f"{fn}: bias must be ({n},) {x.dtype} like x, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous (got strides "
                             f"{t.stride()} for shape {tuple(t.shape)})")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K) float16/bfloat16/float32 contiguous, qweight (N, K) int8, qscale (N,) float32,
    bias (N,) in x's dtype or None -> (..., N) in x's dtype, like F.linear with the weight
    qweight * qscale[:, None] / 127 (but never materialising it). All on one device."""
    _check_inputs(x, qweight, qscale, bias)
    n, k = qweight.shape
    return launch_gemm(_int8_matmul_kernel, _TILES, x, n, k, (qweight, qscale),
                       (qweight.stride(0),), bias)


def launch_gemm(kernel, tiles, x: torch.Tensor, n: int, k: int, weights: tuple,
                weight_strides: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Launch a weight-only GEMM kernel whose arguments are (x, *weights, bias, out, M, N, K,
    stride_xm, *weight_strides, stride_om, HAS_BIAS, IEEE_DOT, BLOCK_M/N/K, GROUP_M) on the
    checked inputs, with the tile of `tiles` for M; shared by int8_linear and nf4_linear."""
    x2 = x.view(-1, k)  # leading dims (batch, tokens, ...) flattened into M
    m = x2.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    out2 = out.view(m, n)
    tile = tile_for(m, tiles)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    kernel[grid](
        x2, *weights, out2 if bias is None else bias, out2,  # placeholder bias: never read
        m, n, k, x2.stride(0), *weight_strides, out2.stride(0),
        HAS_BIAS=bias is not None, IEEE_DOT=x.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=GROUP_M,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **FP_FUSION,
    )
    return out
