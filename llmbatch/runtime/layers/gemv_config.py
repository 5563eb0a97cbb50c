"""Tile configurations of layers/gemv.py (the one-row GEMV of batch-1 decode): the config
type, the measured table and its lookup, and the split-K counter count. Re-exported by gemv.py
(gemv.GemvConfig, gemv.pick_config, gemv.counter_tiles)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import triton

MAX_SPLIT_K = 16  # the last-arrival reduce unrolls its loop over the splits


@dataclass(frozen=True)
class GemvConfig:
    """One tile configuration: BLOCK_N weight rows x BLOCK_K columns a loop step, split_k
    K ranges per column tile (1: no workspace, no counter), num_stages weight tiles in flight
    (> 1: Triton's pipeliner streams them through shared memory with cp.async, ahead of the
    multiply; ptxas sm_90, 16 x 512 bf16: 17 KB shared at 2 stages, 34 KB at 3; 1: plain
    vector loads, one tile at a time a program)."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    split_k: int = 1
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if (not isinstance(self.split_k, int) or isinstance(self.split_k, bool)
                or not 1 <= self.split_k <= MAX_SPLIT_K):
            raise ValueError(f"GemvConfig.split_k must be an int in 1..{MAX_SPLIT_K}, got "
                             f"{self.split_k!r}")
        if not 1 <= self.num_stages <= 4:
            raise ValueError(f"GemvConfig.num_stages must be in 1..4, got {self.num_stages}")


# Measured (stop 17, H200, bench_gemv_layouts, bf16, weights read from DRAM, us per call): one
# 16 x 512 tile a loop step, 4 warps, NO split, 3 stages beat cuBLAS's F.linear on qkv 3072 x
# 2048 (5.74 vs 6.49), o_proj 2048 x 2048 (4.87 vs 6.12) and down 2048 x 8192 (11.87 vs 13.66),
# tie on gate_up (18.27 vs 18.34) and win on the LM head (118.5 vs 125.8); stop 15's split-K
# rows (qkv / o_proj split 2, down split 4) lost to it (7.13, 6.08, 12.19): at these sizes the
# partial-sum round trip and the last-arrival reduce cost more than the extra programs gain.
# So one row for every shape; split-K stays available through an explicit GemvConfig. Rows:
# (max N_w, max K, config), first match wins; N_w counts gate_up's merged [gate; up] rows.
_CONFIG_TABLE: tuple[tuple[int, int, GemvConfig], ...] = (
    (1 << 31, 1 << 31, GemvConfig(block_n=16, block_k=512, num_warps=4, split_k=1)),
)


def pick_config(n_w: int, k: int, gate_up: bool = False) -> GemvConfig:
    """Tile config for n_w weight rows and reduction length k (gate_up: two tiles a program)."""
    cfg = next(c for max_n, max_k, c in _CONFIG_TABLE if n_w <= max_n and k <= max_k)
    if k < cfg.block_k:  # small K (the tiny test models): one chunk, fewer masked lanes
        cfg = replace(cfg, block_k=max(16, triton.next_power_of_2(k)))
    if gate_up:
        # ptxas, sm_90: a 16 x 512 tile at 4 warps is 128 registers a thread; gate_up's two
        # accumulators take 244-255 at 4 warps (spilling in float32), 128 at 8.
        cfg = replace(cfg, num_warps=max(cfg.num_warps, 8))
    return cfg


def counter_tiles(n_w: int, gate_up: bool, cfg: GemvConfig) -> int:
    """Column tiles of a call: the counters it needs."""
    return triton.cdiv(n_w // 2 if gate_up else n_w, cfg.block_n)
