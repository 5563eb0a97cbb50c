"""Fused element-wise Triton kernels: RMSNorm (with the residual add) and SiLU·mul (rotary, with
the K/V store, is in fused_rotary.py).

Each replaces several torch kernels (add, pow, mean, rsqrt, mul, cast, mul) with one pass over
the row, so a decode step reads and writes each activation once. On an H200 (bench/RESULTS.md)
they made W-RANDOM 1.50x, W-PREFIX 1.23x and batch-1 decode 1.54x faster, so the switch,
EngineConfig.fused_kernels, is on by default; ModelRunner applies it on CUDA only (the CPU
path stays torch). `BENCH_UNFUSED=1 bench/gpu_check.sh` measures the A/B again.

Numerics copy layers/norm.py and layers/activation.py rounding step by rounding step, so the
only difference from the torch modules is the order of the float32 sum of squares:
    RMSNorm:  s = round_dtype(x + residual)                     (residual_out)
              n = round_dtype(float(s) * rsqrt(mean(float(s)^2) + eps))
              out = round_out(float(weight) * float(n)),  out dtype = promote(weight, x)
    SiluAndMul: g = round_dtype(silu(float(gate))); out = round_dtype(float(g) * float(up))
norm.py and activation.py call these.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests; set before triton is
first imported).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime import pdl
from llmbatch.runtime.fp_fusion import FP_FUSION
from llmbatch.runtime.pdl import pdl_wait_then_release

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One program holds a whole row in registers; beyond this the row would spill (no model we
# serve has a hidden size this large).
MAX_HIDDEN = 32768
# SiLU·mul splits each row into column tiles of this many elements.
_SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     x_row_stride, res_row_stride, out_row_stride, res_out_row_stride,
                     hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    # One program per token row; BLOCK >= hidden (a power of two), the tail masked.
    if USE_PDL:
        pdl_wait_then_release()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
        # The sum is rounded to the input dtype first (norm.py adds in the input dtype).
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * res_out_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # Masked lanes are 0, so they add nothing to the sum; divide by the true hidden size.
    mean_sq = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.math.rsqrt(mean_sq + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * normed
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, d,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    # Program (row, column tile): gate = x[row, :d], up = x[row, d:2d].
    if USE_PDL:
        pdl_wait_then_release()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    base = x_ptr + row * x_row_stride
    gate = tl.load(base + cols, mask=mask, other=0.0)
    up = tl.load(base + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu rounded to the input dtype, as F.silu returns it, before the multiply.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(gate.dtype), mask=mask)


def _check_activation(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} is not supported by the fused kernels "
                         f"(use float16, bfloat16 or float32)")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} needs a non-empty last dim, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape "
                         f"{tuple(t.shape)})")


def rms_norm_supported(x: torch.Tensor, residual: Optional[torch.Tensor],
                       weight: torch.Tensor) -> bool:
    """True when fused_rms_norm accepts these inputs; RMSNorm falls back to torch otherwise
    (e.g. a strided per-head q/k view)."""
    ok = (x.dtype in SUPPORTED_DTYPES and x.is_contiguous() and x.dim() >= 1
          and 0 < x.shape[-1] <= MAX_HIDDEN and weight.dtype in SUPPORTED_DTYPES
          and weight.shape == (x.shape[-1],) and weight.is_contiguous()
          and weight.device == x.device)
    if residual is not None:
        ok = ok and (residual.shape == x.shape and residual.dtype == x.dtype
                     and residual.is_contiguous() and residual.device == x.device)
    return ok


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: Optional[torch.Tensor] = None):
    """x, residual: (..., hidden) same dtype, contiguous; weight: (hidden,).
    Returns out like RMSNorm.forward: norm(x) when residual is None, else
    (norm(x + residual), x + residual). out has dtype promote(weight, x)."""
    _check_activation("x", x)
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"fused_rms_norm supports hidden size <= {MAX_HIDDEN}, got {hidden}")
    if weight.dtype not in SUPPORTED_DTYPES or tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight must be ({hidden},) float16/bfloat16/float32, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if not weight.is_contiguous() or weight.device != x.device:
        raise ValueError(f"weight must be contiguous on {x.device}, got {weight.device}")
    if residual is not None:
        _check_activation("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} on "
                             f"{residual.device} must match x {tuple(x.shape)} {x.dtype} "
                             f"on {x.device}")
    x2 = x.view(-1, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    out2 = out.view(-1, hidden)
    if residual is None:
        res2, res_out2 = x2, out2  # placeholders; HAS_RESIDUAL=False never touches them
    else:
        res2 = residual.view(-1, hidden)
        res_out = torch.empty_like(x)
        res_out2 = res_out.view(-1, hidden)
    num_rows = x2.shape[0]
    if num_rows:
        block = triton.next_power_of_2(hidden)
        num_warps = 1 if block <= 512 else (4 if block <= 4096 else 8)
        _rms_norm_kernel[(num_rows,)](
            x2, res2, weight, out2, res_out2,
            x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0),
            hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
            **FP_FUSION, **pdl.launch_kwargs(x.device))
    if residual is None:
        return out
    return out, res_out


def silu_and_mul_supported(x: torch.Tensor) -> bool:
    return (x.dtype in SUPPORTED_DTYPES and x.is_contiguous() and x.dim() >= 1
            and x.shape[-1] > 0 and x.shape[-1] % 2 == 0)


def fused_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2*d) = [gate | up], contiguous -> silu(gate) * up, shape (..., d)."""
    _check_activation("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"fused_silu_and_mul needs an even last dim, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = x.view(-1, 2 * d)
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    if x2.shape[0]:
        block = min(_SILU_BLOCK, triton.next_power_of_2(d))
        grid = (x2.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), d,
                                   BLOCK=block, num_warps=4 if block >= 512 else 1,
                                   **FP_FUSION, **pdl.launch_kwargs(x.device))
    return out
