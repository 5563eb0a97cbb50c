"""layers/gemv_config.py's tile table as measured in stop 19 (H200, bench_gemv_layouts): the
pick for each 1B decode matmul, where other models' shapes fall, the small-K and gate_up
adjustments, set_config_table (bench_batch1's "gemv tiles of stop 17" row), and each new row's
tile through the kernel under the Triton interpreter against torch (one small case each)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from llmbatch.runtime.layers import gemv  # noqa: E402
from llmbatch.runtime.layers import gemv_config  # noqa: E402
from tests.runtime.test_skinny_matmul import EPS, operands, tol, torch_norm  # noqa: E402

# (block_n, block_k, num_warps, split_k, num_stages) of each 1B matmul, (N_w, K); gate_up's
# N_w counts its merged [gate; up] rows and its launch gets >= 8 warps.
SHAPES_1B = {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048),
             "down": (2048, 8192), "lm_head": (128256, 2048)}
PICKS_STOP19 = {"qkv": (8, 512, 4, 1, 3), "o_proj": (16, 512, 4, 1, 4),
                "gate_up": (16, 512, 8, 1, 3), "down": (8, 1024, 4, 1, 3),
                "lm_head": (16, 512, 4, 1, 3)}
PICKS_STOP17 = {name: (16, 512, 8 if name == "gate_up" else 4, 1, 3) for name in SHAPES_1B}


def _picks() -> dict:
    return {name: tuple(getattr(gemv.pick_config(n_w, k, name == "gate_up"), f)
                        for f in ("block_n", "block_k", "num_warps", "split_k", "num_stages"))
            for name, (n_w, k) in SHAPES_1B.items()}


def test_1b_shapes_get_the_measured_picks_and_the_lm_head_the_catch_all():
    assert _picks() == PICKS_STOP19
    assert gemv.pick_config(128256, 2048) == gemv_config.STOP17_CONFIG


@pytest.mark.parametrize("n_w,k,want", [
    (4096, 14336, "down"),          # an 8B's down: N_w <= 4096, K > 4096
    (4096, 4096, "catch-all"),      # an 8B's o_proj: K between 2048 and 4096, unmeasured
    (3072, 3072, "catch-all"),      # a 3B's o_proj
    (6144, 4096, "catch-all"),      # an 8B's qkv
    (1024, 1536, "o_proj"),
    (2560, 2048, "qkv"),
    (8192, 8192, "catch-all"),      # wide and long: the LM-head-like catch-all
])
def test_other_models_shapes_fall_on_the_nearest_measured_row(n_w, k, want):
    rows = {"o_proj": (16, 512, 4), "qkv": (8, 512, 3), "down": (8, 1024, 3),
            "catch-all": (16, 512, 3)}
    c = gemv.pick_config(n_w, k)
    assert (c.block_n, c.block_k, c.num_stages) == rows[want]


def test_small_k_and_gate_up_adjustments_on_the_new_rows():
    """The tiny test models land on o_proj's row (4 stages): a K below the tile's shrinks the
    tile; gate_up's launches get 8 warps and at most 3 stages whatever the row (two tiles a
    stage: 4 would need 102 KB of shared memory in bf16, over sm_86/89's 99 KB)."""
    assert gemv.pick_config(512, 128, gate_up=True) == gemv.GemvConfig(
        block_n=16, block_k=128, num_warps=8, split_k=1, num_stages=3)
    assert gemv.pick_config(2048, 1024, gate_up=True).num_stages == 3
    assert gemv.pick_config(128, 8) == gemv.GemvConfig(
        block_n=16, block_k=16, num_warps=4, split_k=1, num_stages=4)
    assert gemv.pick_config(3072, 576, gate_up=True) == gemv.GemvConfig(
        block_n=8, block_k=512, num_warps=8, split_k=1, num_stages=3)


def test_set_config_table_swaps_the_table_and_refuses_one_without_a_catch_all():
    before = gemv_config.set_config_table(gemv_config.STOP17_TABLE)
    try:
        assert _picks() == PICKS_STOP17
    finally:
        assert gemv_config.set_config_table(before) == gemv_config.STOP17_TABLE
    assert _picks() == PICKS_STOP19
    with pytest.raises(ValueError, match="catch-all"):
        gemv_config.set_config_table(((4096, 4096, gemv_config.STOP17_CONFIG),))
    assert _picks() == PICKS_STOP19


# Each config of a new row at its full tile (no small-K shrink: K 1100 is two 1024-chunks with
# a tail, three 512-chunks with a tail; N 24 is 3 x 8 or 16 + 8 rows), float32: plain against
# F.linear, the norm prologue against torch, and the weight prefetch (PREFETCH_W: the first
# tile before the PDL wait, the engine default from stop 19) bitwise equal to the plain loop.
NEW_CONFIGS = sorted({c for _, _, c in gemv_config._CONFIG_TABLE} - {gemv_config.STOP17_CONFIG},
                     key=repr)


def test_the_table_has_three_new_configs():
    assert {(c.block_n, c.block_k, c.num_stages) for c in NEW_CONFIGS} == {
        (8, 512, 3), (16, 512, 4), (8, 1024, 3)}


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("cfg", NEW_CONFIGS,
                         ids=lambda c: f"n{c.block_n}k{c.block_k}p{c.num_stages}")
def test_new_configs_match_torch_in_the_interpreter(cfg):
    x, w, _, nw = operands(1, 24, 1100, torch.float32, seed=7)
    got = gemv.gemv_linear(x, w, config=cfg, prefetch=False)
    torch.testing.assert_close(got, F.linear(x, w), **tol(torch.float32))
    assert torch.equal(gemv.gemv_linear(x, w, config=cfg, prefetch=True), got)
    normed = gemv.gemv_linear(x, w, norm_weight=nw, eps=EPS, config=cfg)
    torch.testing.assert_close(normed, F.linear(torch_norm(x, nw), w), **tol(torch.float32))
