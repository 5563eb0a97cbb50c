"""Rotary position embedding applied by absolute position ids.

Layout is transformers' Llama one ("rotate half", non-interleaved): a head vector
x = [x1 | x2] with halves of head_dim/2 is rotated pairwise (x1[i], x2[i]) by the angle
position * inv_freq[i]:
    out = [x1*cos - x2*sin | x2*cos + x1*sin]
cos/sin are computed on the fly from the (num_tokens,) positions of this step (no max-length
cache to size), unless build_table was called: on CUDA ModelRunner builds a table of every
position up to max_model_len (enable_rope_tables), and a step gathers its rows (one launch
instead of ~6 tiny element-wise ones: float cast, multiply, cos, sin, two casts). The rows are
the same element-wise kernels' results, so they are bit-equal to computing them per step.

Supported rope types: 'default', 'linear' and 'llama3' (Llama 3.1 frequency-dependent scaling).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """(head_dim/2,) float32: theta^(-2i/head_dim), computed as transformers does (bit-equal)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (rope_theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama 3.1 scaling: wavelengths longer than original_max/low_freq_factor are stretched by
    `factor`, shorter than original_max/high_freq_factor are kept, and the band in between is
    blended linearly in (original_max / wavelength)."""
    if high_freq_factor == low_freq_factor:
        raise ValueError("llama3 rope_scaling needs high_freq_factor != low_freq_factor")
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = original_max_position / low_freq_factor
    short_wavelen = original_max_position / high_freq_factor
    stretched = torch.where(wavelen > long_wavelen, inv_freq / factor, inv_freq)
    # 0 at the long end of the band, 1 at the short end.
    blend = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * stretched / factor + blend * stretched
    in_band = ~(wavelen < short_wavelen) & ~(wavelen > long_wavelen)
    return torch.where(in_band, blended, stretched)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_theta: float,
                 rope_scaling: Optional[dict] = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        scaling = dict(rope_scaling or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        inv_freq = default_inv_freq(head_dim, float(rope_theta))
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            try:
                inv_freq = llama3_inv_freq(
                    inv_freq, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                    float(scaling["high_freq_factor"]),
                    int(scaling["original_max_position_embeddings"]))
            except KeyError as e:
                raise ValueError(f"llama3 rope_scaling is missing {e.args[0]!r}") from None
        elif rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        self.rope_type = rope_type
        # float32 always (not cast with the model): angles need the precision at long positions.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (max_positions, 2, head_dim/2): cos then sin of each position, in one dtype.
        self.table: Optional[torch.Tensor] = None

    def build_table(self, max_positions: int, dtype: torch.dtype) -> None:
        """Precompute cos/sin of positions [0, max_positions) on inv_freq's device. Every
        position a step passes must then be < max_positions (the engine's max_model_len)."""
        positions = torch.arange(max_positions, device=self.inv_freq.device)
        cos, sin = self._compute(positions, dtype)              # (max_positions, 1, half) each
        self.table = torch.cat((cos, sin), dim=1)               # (max_positions, 2, half)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_tokens,) -> cos, sin of shape (num_tokens, 1, head_dim/2) in `dtype`; from the
        table (views of one gathered (num_tokens, 2, head_dim/2) tensor, row stride head_dim)
        when it was built for this dtype and device."""
        table = self.table
        if table is not None and table.dtype == dtype and table.device == positions.device:
            rows = table.index_select(0, positions)
            return rows[:, 0:1], rows[:, 1:2]
        return self._compute(positions, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (num_tokens, num_heads, head_dim)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (num_tokens,); query (num_tokens, num_heads, head_dim);
        key (num_tokens, num_kv_heads, head_dim) -> rotated query, key."""
        cos, sin = self.cos_sin(positions, query.dtype)
        return self.rotate(query, cos, sin), self.rotate(key, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rope_type={self.rope_type}"


def enable_rope_tables(model, max_positions: int, dtype: torch.dtype) -> int:
    """build_table on every RotaryEmbedding of `model`; returns how many. CUDA only (ModelRunner):
    there the table rows equal the per-step computation bit for bit, since the same element-wise
    kernels compute each element whatever the batch; CPU kernels vectorize part of a tensor and
    may round a lane differently."""
    rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    for rotary in rotaries:
        rotary.build_table(max_positions, dtype)
    return len(rotaries)


def rope_params_from_config(config) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from a transformers config of either generation:
    `rope_parameters` (transformers >= 5, holds rope_theta too) or `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        theta = getattr(config, "rope_theta", 10000.0)
        return float(theta), getattr(config, "rope_scaling", None)
    params = dict(params)
    if "rope_theta" not in params:
        raise ValueError("per-layer rope_parameters are not supported for Llama-family models")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported for Llama-family models")
    theta = float(params.pop("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return theta, (params if rope_type != "default" else None)
