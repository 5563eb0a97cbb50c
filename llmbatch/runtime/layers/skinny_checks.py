"""Input checks of layers/skinny_matmul.py: what skinny_linear accepts (decode steps of at most
MAX_M rows, contiguous weight rows, matching dtypes and devices), with one clear error line per
bad input; skinny_matmul_supported is the non-raising form the model path asks per step."""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_M = 16  # rows per call: one padded BLOCK_M tile


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def skinny_matmul_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when skinny_linear accepts this x / weight pair (callers fall back otherwise)."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and x.dim() == 2 and 1 <= x.shape[0] <= MAX_M and x.shape[1] > 0
            and x.stride(1) == 1 and x.dtype in SUPPORTED_DTYPES
            and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.shape[0] > 0
            and weight.dtype == x.dtype and weight.is_contiguous()
            and weight.device == x.device)


def _check_vector(name: str, t: Optional[torch.Tensor], length: int, x: torch.Tensor) -> None:
    if t is None:
        return
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != (length,) or t.dtype != x.dtype
            or t.device != x.device or not t.is_contiguous()):
        got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a contiguous ({length},) {x.dtype} tensor on "
                         f"{x.device}, got {got}")


def check_inputs(x, weight, bias, norm_weight, residual, gate_up) -> int:
    """Raises ValueError on anything skinny_linear cannot compute; returns N (output columns)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.shape[1] == 0:
        raise ValueError(f"x must be (M, K) with 1 <= M <= {MAX_M} and K > 0, got "
                         f"{tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x rows must be contiguous (stride(1) == 1), got strides {x.stride()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (N, K={x.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight {_describe(weight)} must match x {_describe(x)} in dtype "
                         f"and device")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous, got strides {weight.stride()}")
    if gate_up and weight.shape[0] % 2:
        raise ValueError(f"gate_up weight needs an even number of rows ([gate; up]), got "
                         f"{weight.shape[0]}")
    if gate_up and residual is not None:
        raise ValueError("gate_up and residual epilogues cannot be combined")
    n = weight.shape[0] // 2 if gate_up else weight.shape[0]
    _check_vector("bias", bias, weight.shape[0], x)
    _check_vector("norm_weight", norm_weight, x.shape[1], x)
    if residual is not None:
        if (not isinstance(residual, torch.Tensor) or residual.dim() != 2
                or tuple(residual.shape) != (x.shape[0], n) or residual.dtype != x.dtype
                or residual.device != x.device or residual.stride(1) != 1):
            got = _describe(residual) if isinstance(residual, torch.Tensor) else type(residual)
            raise ValueError(f"residual must be ({x.shape[0]}, {n}) {x.dtype} on {x.device} "
                             f"with contiguous rows, got {got}")
    return n
