"""splitmix64 mixing and the seed of one row or request derived from a base seed (no torch).

A request without its own seed gets `derive_seed(base_seed, index)`: the `index`-th output of
a splitmix64 stream started at mix64(base_seed). Mixing both inputs matters: the additive rule
it replaced (`base_seed + index`) gave seed s + 1 row i the seed of seed s row i + 1, so two
jobs one seed apart shared all but one of their samples. Here any two (base, index) pairs
give unrelated seeds, and the result is a pure function of them, so it never depends on
sharding, ordering, batch size or resume. The result is an int64 (what Parquet stores); the
sampler uses its 64-bit pattern (seeded_uniforms.row_key).
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
# splitmix64 constants (Steele, Lea, Flood 2014): the stream increment and the two multipliers.
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def to_int64(x: int) -> int:
    """A 64-bit pattern as the int64 value it stands for (two's complement)."""
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def mix64(z: int) -> int:
    """splitmix64 finaliser on Python ints: a bijection of 64-bit patterns (negative inputs
    are taken as their two's complement pattern). Returns an unsigned 64-bit value."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def derive_seed(base_seed: int, index: int) -> int:
    """int64 seed of item `index` (>= 0) under `base_seed` (any int64, e.g. sampling.seed)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return to_int64(mix64(mix64(base_seed) + (index + 1) * GAMMA))
