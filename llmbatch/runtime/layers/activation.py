"""SiLU-gated MLP activation on a fused [gate | up] tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """(..., 2*d) = [gate | up] -> silu(gate) * up, shape (..., d)."""

    # True: forward runs the Triton kernel of layers/fused_kernels.py (set by
    # runtime/kernel_paths.py).
    use_fused_kernel: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused_kernel:
            from llmbatch.runtime.layers import fused_kernels

            if fused_kernels.silu_and_mul_supported(x):
                return fused_kernels.fused_silu_and_mul(x)
        if x.shape[-1] % 2:
            raise ValueError(f"SiluAndMul needs an even last dim, got {x.shape[-1]}")
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
