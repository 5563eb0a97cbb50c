"""RMSNorm with an optional fused residual add.

    forward(x)           -> norm(x)
    forward(x, residual) -> (norm(x + residual), x + residual)
The second form lets a decoder layer carry the un-normalized residual stream between layers
without a separate add kernel. Numerics follow transformers' Llama: the sum is taken in the
input dtype, the normalization in float32, the result cast back before the weight multiply.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from llmbatch.runtime.layers.weight_utils import default_weight_loader


class RMSNorm(nn.Module):
    # True: forward runs the Triton kernel of layers/fused_kernels.py where it supports the
    # input (same numerics up to the float32 summation order).
    use_fused_kernel: bool = False

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False)
        # Replicated on every rank.
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (..., hidden_size). Normalizes over the last dim (also per head for q/k norm)."""
        # use_fused_kernel: set by runtime/kernel_paths.py (EngineConfig.fused_kernels, CUDA).
        if self.use_fused_kernel:
            from llmbatch.runtime.layers import fused_kernels

            if fused_kernels.rms_norm_supported(x, residual, self.weight):
                return fused_kernels.fused_rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
