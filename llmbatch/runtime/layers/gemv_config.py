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
    multiply; ptxas sm_90, 16 x 512 bf16: 17 KB shared at 2 stages, 34 KB at 3, 51 KB at 4;
    8 x 1024 at 3: 36 KB; 1: plain vector loads, one tile at a time a program)."""

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


# Measured (stop 19, 2026-11-27, H200, bench_gemv_layouts at a5ab774, bf16, weights read from
# DRAM, CUDA-graph timed, us per call; gemv_n{block_n}k{block_k}w{warps}s{split}p{stages}):
#
#     shape (N_w x K)        cuBLAS   n16k512p3   pick                    row
#     qkv 3072 x 2048         6.41      5.70      n8k512p3    5.44       N_w <= 4096, K <= 2048
#     o_proj 2048 x 2048      6.12      4.86      n16k512p4   4.58       N_w <= 2048, K <= 2048
#     down 2048 x 8192       13.75     11.80      n8k1024p3  10.20       N_w <= 4096, K > 4096
#     gate_up 16384 x 2048   17.84     17.92      n16k512p3  (< 0.5 %: noise)    catch-all
#     lm_head 128256 x 2048 122.52    116.03      n16k512p3  (n8k512p3 115.74)  catch-all
#
# ~35 us a token at batch 1 (W-BATCH1 TPOT 0.97 ms), by the sum of the per-call savings over 16
# layers: UNMEASURED end to end, and unmeasured with the weight prefetch (PREFETCH_W, the engine
# default "tile" from stop 19), which peels the first tile and changes registers a little;
# bench_batch1's "gemv tiles of stop 17" row A/Bs this table against the single row below.
# ptxas sm_90 (bench.compile_kernels, the engine's launches, no spills; the 3-stage 16 x 512
# row was 128 registers on qkv, 142 with PREFETCH_W): qkv 80 registers in every prefetch / PDL
# variant, 20 KB shared; o_proj 122 (128 with PDL and PREFETCH_W), 51 KB; down 120 (96 with
# PREFETCH_W), 36 KB; gate_up (8 warps) and the LM head unchanged (128; 122 / 128).
# Also tried: n4k1024p3 (o_proj 4.60), 8 warps (no gain), split 2 of 32 x 256 (23-53 % slower).
# Stop 17 measured the single 16 x 512, 4 warps, no split, 3 stages row on every shape (it
# beat stop 15's split-K rows: the partial-sum round trip and the reduce cost more than the
# extra programs gain); it stays the catch-all. Shapes the sweep never ran (other models:
# K in 2048..4096, or N_w > 4096 with any K; other GPUs) get a row by these keys, unmeasured.
# Rows: (max N_w, max K, config), first match wins; N_w counts gate_up's merged [gate; up]
# rows; the last row must match every shape.
STOP17_CONFIG = GemvConfig(block_n=16, block_k=512, num_warps=4, split_k=1, num_stages=3)
STOP17_TABLE: tuple[tuple[int, int, GemvConfig], ...] = ((1 << 31, 1 << 31, STOP17_CONFIG),)
_CONFIG_TABLE: tuple[tuple[int, int, GemvConfig], ...] = (
    (2048, 2048, GemvConfig(block_n=16, block_k=512, num_warps=4, split_k=1, num_stages=4)),
    (4096, 2048, GemvConfig(block_n=8, block_k=512, num_warps=4, split_k=1, num_stages=3)),
    (4096, 4096, STOP17_CONFIG),
    (4096, 1 << 31, GemvConfig(block_n=8, block_k=1024, num_warps=4, split_k=1, num_stages=3)),
    *STOP17_TABLE,
)


def set_config_table(table: tuple[tuple[int, int, GemvConfig], ...]
                     ) -> tuple[tuple[int, int, GemvConfig], ...]:
    """Make `table` pick_config's table (bench_batch1's "gemv tiles of stop 17" row); returns
    the one it replaces, to put back. Read at every gemv_linear launch, so it takes effect at
    the next launch (a CUDA graph keeps what it captured). Counters sized before it
    (llama_skinny) cover only the old table's split-K tiles: swap to split-1 tables only there."""
    global _CONFIG_TABLE
    table = tuple(table)
    if not table or table[-1][:2] != (1 << 31, 1 << 31):
        raise ValueError("a gemv config table ends with a catch-all row (1 << 31, 1 << 31, cfg)")
    previous, _CONFIG_TABLE = _CONFIG_TABLE, table
    return previous


def pick_config(n_w: int, k: int, gate_up: bool = False, rows: int = 1) -> GemvConfig:
    """Tile config for n_w weight rows and reduction length k (gate_up: two tiles a program),
    for x of `rows` rows (> 1: layers/gemv_rows.py's kernel; its tile below)."""
    cfg = next(c for max_n, max_k, c in _CONFIG_TABLE if n_w <= max_n and k <= max_k)
    if rows > 1:
        # The multi-row kernel keeps a (ROWS, BLOCK_N, BLOCK_K // 8) float32 accumulator and
        # the rows' x chunk besides the tile. ptxas sm_90, ROWS = 8, bf16, 1B shapes: the
        # table's 16 x 512 at 4 warps takes 233 registers (o_proj, LM head) and gate_up's
        # 16 x 512 at 8 warps spills; 8 x 512 at 8 warps takes 64 (96 for gate_up), no
        # spills. So at most 8 x 512 at 8 warps, whatever the one-row row says: UNMEASURED on
        # a GPU (bench_gemv_layouts' M = 5 cells are there to measure it).
        cfg = replace(cfg, block_n=min(cfg.block_n, 8), block_k=min(cfg.block_k, 512),
                      num_warps=8)
    if k < cfg.block_k:  # small K (the tiny test models): one chunk, fewer masked lanes
        cfg = replace(cfg, block_k=max(16, triton.next_power_of_2(k)))
    if gate_up:
        # ptxas, sm_90: a 16 x 512 tile at 4 warps is 128 registers a thread; gate_up's two
        # accumulators take 244-255 at 4 warps (spilling in float32), 128 at 8. The 1B gate_up
        # is on the catch-all; an 8-row tile would not need 8 warps for registers, but gate_up
        # lands on those rows only in the tiny test models and small models (unmeasured).
        # At most 3 stages: gate_up streams two tiles a stage, and o_proj's 4-stage row would
        # take 102 KB of shared memory in bf16 (204 KB in float32), above sm_86/89's 99 KB
        # and the A100's 163 KB: the start-up check would then turn the gemv layers off. At 3
        # stages bf16 takes 68 KB; float32 still takes ~136 KB, over sm_86/89's limit, as on
        # the catch-all row before (float32 models on those GPUs lose the gemv layers).
        cfg = replace(cfg, num_warps=max(cfg.num_warps, 8),
                      num_stages=min(cfg.num_stages, 3))
    return cfg


def counter_tiles(n_w: int, gate_up: bool, cfg: GemvConfig) -> int:
    """Column tiles of a call: the counters it needs."""
    return triton.cdiv(n_w // 2 if gate_up else n_w, cfg.block_n)
