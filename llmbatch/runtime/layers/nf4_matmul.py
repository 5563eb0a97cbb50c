"""Weight-only nf4 GEMM (w4a16) for bitsandbytes nf4 weights, in Triton.

    y[M, N] = x[M, K] @ W^T  (+ bias[N]),   W[n, k] = code[nibble(e)] * absmax[e // 64],
                                             e = n * K + k  (the flat row-major index)

Storage (layers/quantization.py, quantize_nf4): the (N, K) weight is quantized as ONE flat
row-major vector in blocks of 64 elements. qweight holds N*K/2 bytes, two 4-bit codes each:
element e is in byte e // 2, the HIGH nibble for even e and the low nibble for odd e (checked
against bitsandbytes' dequantize_4bit by tests/runtime/test_nf4_matmul.py). qabsmax is
(N*K/64,) float32, code the 16 NF4 levels (float32). The launcher requires K % 64 == 0 (true of
every real model's linear inputs): then every block lies inside one weight row, a row starts
at byte n*K/2 and absmax n*K/64, and the kernel needs no cross-row arithmetic. apply() falls
back to bitsandbytes for other K.

Even/odd split: byte j of a row tile holds elements 2j (high) and 2j+1 (low). Instead of
interleaving the two nibble tiles back into K order, the K sum is split in two:
x[:, even k] @ W_hi + x[:, odd k] @ W_lo, two tl.dot calls on (BLOCK_K/2, BLOCK_N) tiles. The
x loads are stride-2 (x is small and cached), the weight loads stay contiguous bytes along K
(K-major pointer layout, as int8_matmul.py, so Triton pipelines them).

Per K step: load the packed bytes, look the nibbles up in the 16-float code table (a gather of
a 64-byte buffer: L1 hits), multiply by the block's absmax (gathered per byte: both nibbles of a
byte share a block), round to x's dtype (what the dequantize fallback does too), tl.dot with
float32 accumulation; bias in the float32 epilogue, one rounding to x's dtype at the end.
float32 x uses IEEE dots (no TF32).

Batch invariance and CUDA graphs: as int8_matmul.py (tile chosen by M bucket only; host logic
depends on shapes/dtypes only, no syncs, output from torch.empty).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime.layers import int8_matmul
from llmbatch.runtime.layers.int8_matmul import SUPPORTED_DTYPES, Tile, grouped_tile

BLOCKSIZE = 64  # elements per absmax (quantization.NF4_BLOCKSIZE; K must be a multiple)

# (largest M, tile) ascending; the last entry takes every larger M. UNTUNED: reasoned from the
# int8 table (never measured on a GPU). BLOCK_K counts elements (BLOCK_K/2 bytes per weight
# row), so each half-dot has K = BLOCK_K/2 >= 16.
#   decode (M <= 16): narrow N tiles for more programs; a deep K tile (128 bytes of each row
#     per step) keeps weight bytes in flight.
#   M <= 64: 64x64 tiles; larger M (prefill): 128x128, 8 warps.
_TILES = (
    (16, Tile(16, 32, 256, 4, 4)),
    (64, Tile(64, 64, 128, 4, 4)),
    (None, Tile(128, 128, 64, 8, 3)),
)


def tile_for(m: int) -> Tile:
    """The launch configuration for an M-row call (M >= 1)."""
    return int8_matmul.tile_for(m, _TILES)


def all_tiles() -> tuple[Tile, ...]:
    """Every configuration the launcher may use (bench/compile_kernels.py compiles each)."""
    return tuple(tile for _, tile in _TILES)


@triton.jit
def _nf4_matmul_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr,
                       M, N, K, stride_xm, stride_om,
                       HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # 1-D grid over (M tiles x N tiles), grouped as in int8_matmul.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # (BLOCK_M,) rows of x / y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # (BLOCK_N,) weight rows = cols of y
    offs_j = tl.arange(0, BLOCK_K // 2)                # (BLOCK_K/2,) bytes = element pairs
    m_mask = offs_m < M
    n_mask = offs_n < N
    row_bytes = K // 2          # K % 64 == 0 (launcher): rows are whole bytes and blocks
    row_blocks = K // 64
    # int64 offsets: N * K / 2 may exceed 2**31 for an LM head.
    n64 = offs_n.to(tl.int64)
    # x at the even columns 2j of the K step; the odd columns are the next element.
    xe_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + 2 * offs_j[None, :]
    # (BLOCK_K/2, BLOCK_N) byte tile, contiguous along dim 0 (K-major).
    w_ptrs = w_ptr + n64[None, :] * row_bytes + offs_j[:, None]
    a_row = absmax_ptr + n64[None, :] * row_blocks                 # (1, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j_mask = offs_j < (K - k0) // 2
        x_mask = m_mask[:, None] & j_mask[None, :]
        w_mask = j_mask[:, None] & n_mask[None, :]
        # Masked rows / columns read 0 (x) and absmax 0, so they add exactly nothing.
        xe = tl.load(xe_ptrs, mask=x_mask, other=0.0)
        xo = tl.load(xe_ptrs + 1, mask=x_mask, other=0.0)
        packed = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.int32)
        # Element 2j (and 2j+1) of the step is in block (k0 + 2j) // 64 of its row.
        scale = tl.load(a_row + (k0 + 2 * offs_j[:, None]) // 64, mask=w_mask, other=0.0)
        w_hi = (tl.load(code_ptr + (packed >> 4)) * scale).to(xe.dtype)   # elements 2j
        w_lo = (tl.load(code_ptr + (packed & 15)) * scale).to(xe.dtype)   # elements 2j+1
        if IEEE_DOT:
            acc = tl.dot(xe, w_hi, acc, input_precision="ieee")
            acc = tl.dot(xo, w_lo, acc, input_precision="ieee")
        else:
            acc = tl.dot(xe, w_hi, acc)
            acc = tl.dot(xo, w_lo, acc)
        xe_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2

    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check_inputs(x, qweight, qabsmax, code, n, k, bias) -> None:
    """One-line ValueError/TypeError for anything the kernel cannot take as is."""
    for name, t in (("x", x), ("qweight", qweight), ("qabsmax", qabsmax), ("code", code)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nf4_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, v in (("out_features", n), ("in_features", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"nf4_linear: {name} must be a positive int, got {v!r}")
    if k % BLOCKSIZE:
        raise ValueError(f"nf4_linear: in_features {k} is not a multiple of {BLOCKSIZE} "
                         f"(the kernel needs whole nf4 blocks per weight row)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"nf4_linear: x dtype {x.dtype} is not supported "
                         f"(use float16, bfloat16 or float32)")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} must have last dim {k} (in_features)")
    if qweight.dtype != torch.uint8 or qweight.numel() != n * k // 2:
        raise ValueError(f"nf4_linear: qweight must hold {n * k // 2} uint8 bytes (a "
                         f"({n}, {k}) nf4 weight), got {tuple(qweight.shape)} {qweight.dtype}")
    if qabsmax.dtype != torch.float32 or qabsmax.numel() != n * k // BLOCKSIZE:
        raise ValueError(f"nf4_linear: qabsmax must hold {n * k // BLOCKSIZE} float32 "
                         f"absmax values, got {tuple(qabsmax.shape)} {qabsmax.dtype}")
    if code.dtype != torch.float32 or tuple(code.shape) != (16,):
        raise ValueError(f"nf4_linear: code must be the (16,) float32 NF4 table, got "
                         f"{tuple(code.shape)} {code.dtype}")
    int8_matmul.check_bias_and_layout("nf4_linear", x, n, bias, [
        ("qweight", qweight), ("qabsmax", qabsmax), ("code", code)])


def nf4_linear(x: torch.Tensor, qweight: torch.Tensor, qabsmax: torch.Tensor,
               code: torch.Tensor, out_features: int, in_features: int,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K) float16/bfloat16/float32 contiguous; qweight (N*K/2 bytes, any shape, e.g.
    bitsandbytes' (N*K/2, 1)) uint8, qabsmax (N*K/64,) float32 and code (16,) float32 of a flat
    nf4 quantization of an (N, K) = (out_features, in_features) weight, K % 64 == 0; bias (N,)
    in x's dtype or None -> (..., N) in x's dtype, like F.linear of the dequantized weight
    (never materialised). All on one device."""
    _check_inputs(x, qweight, qabsmax, code, out_features, in_features, bias)
    return int8_matmul.launch_gemm(_nf4_matmul_kernel, _TILES, x, out_features, in_features,
                                   (qweight, qabsmax, code), (), bias)
