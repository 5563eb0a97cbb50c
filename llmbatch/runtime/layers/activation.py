"""SiLU-gated MLP activation on a fused [gate | up] tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """(..., 2*d) = [gate | up] -> silu(gate) * up, shape (..., d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"SiluAndMul needs an even last dim, got {x.shape[-1]}")
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
