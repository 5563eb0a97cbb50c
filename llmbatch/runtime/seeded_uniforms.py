"""Counter-based uniforms for seeded sampling (no torch.Generator, no device RNG state).

Each uniform is splitmix64 of (seed, output index, stream, vocab column): a pure function, so
a request's random draws never depend on batch composition, order, device or step count. See
sampler.py for how the Gumbel-max sampler uses them and how seeds are chosen.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmbatch.runtime.device import host_to_device
from llmbatch.runtime.seed_mixing import GAMMA, MUL1, MUL2, derive_seed, mix64, to_int64

# Distinct salts so the token-sampling stream never coincides with another consumer's stream
# (e.g. a rejection sampler asking for its own uniforms for the same seed and output index).
STREAM_SAMPLE = 0
_NUM_UNIFORM_BITS = 23      # u = (k + 0.5) / 2**23 is exact in float32 and lies in (0, 1)


def _lsr(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: torch's >> is arithmetic, so mask the sign
    extension away."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor. torch int64 multiplication wraps modulo
    2**64 (two's complement), which is exactly the unsigned arithmetic the hash needs."""
    # In place: z is a fresh temporary of the caller, and (rows, vocab) int64 is large.
    z ^= _lsr(z, 30)
    z *= to_int64(MUL1)
    z ^= _lsr(z, 27)
    z *= to_int64(MUL2)
    z ^= _lsr(z, 31)
    return z


def default_seed(base_seed: int, arrival_index: int) -> int:
    """Seed for a request without its own: (per-engine base seed, arrival index) mixed by
    seed_mixing.derive_seed, the rule a job applies to (sampling.seed, row index)."""
    if arrival_index < 0:
        raise ValueError(f"arrival_index must be >= 0, got {arrival_index}")
    return derive_seed(base_seed, arrival_index)


def row_key(seed: int, output_index: int, stream: int = STREAM_SAMPLE) -> int:
    """64-bit start state of the uniform stream of one (seed, output index, stream)."""
    z = mix64(mix64(seed ^ (stream * MUL2)) + (output_index + 1) * GAMMA)
    return mix64(z + GAMMA)


def uniforms_from_keys(keys: torch.Tensor, num_cols: int) -> torch.Tensor:
    """(num_rows,) int64 keys -> (num_rows, num_cols) float32 uniforms in (0, 1).

    Element (r, j) is splitmix64's j-th output after state keys[r]: state + (j+1)*gamma,
    then the finaliser. Only integer ops, so it is bit-identical on every device.
    """
    cols = torch.arange(1, num_cols + 1, dtype=torch.int64, device=keys.device)
    z = keys[:, None] + cols[None, :] * to_int64(GAMMA)     # (num_rows, num_cols), wraps
    z = _mix64(z)
    bits = _lsr(z, 64 - _NUM_UNIFORM_BITS)                     # top 23 bits, in [0, 2**23)
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << _NUM_UNIFORM_BITS))


def seeded_uniforms(
    seeds: Sequence[int],
    output_indices: Sequence[int],
    num_cols: int,
    device: torch.device | str = "cpu",
    stream: int = STREAM_SAMPLE,
) -> torch.Tensor:
    """(len(seeds), num_cols) float32 uniforms in (0, 1), a pure function of
    (seed, output index, stream, column). Other samplers (e.g. speculative decoding's
    rejection step) should pass their own `stream` so their noise is independent."""
    if len(seeds) != len(output_indices):
        raise ValueError(f"{len(seeds)} seeds but {len(output_indices)} output indices")
    keys = [to_int64(row_key(s, i, stream)) for s, i in zip(seeds, output_indices)]
    return uniforms_from_keys(host_to_device(keys, torch.int64, device), num_cols)
