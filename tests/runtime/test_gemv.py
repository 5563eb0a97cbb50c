"""layers/gemv.py on CPU under the Triton interpreter, float32 and float16 (bfloat16 is
unreliable in the interpreter), against the unfused torch path within a float32 tolerance or
about one rounding step of float16, and bitwise where the kernel must round exactly like the
unfused kernels (residual and SiLU·mul epilogues on top of the plain kernel's own output).

Split-K: the interpreter runs programs one after another, so the program of the last split is
the one that reduces; the tests check the reduced result, that every output element is written
(poisoned torch.empty), and that the arrival counters are left all zero for the next call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from llmbatch.runtime.layers import fused_kernels as fk  # noqa: E402
from llmbatch.runtime.layers import gemv  # noqa: E402
from tests.runtime.test_skinny_matmul import (CPU_DTYPES, EPS, operands, tol,  # noqa: E402
                                              torch_norm)

# Tails in N (48 = 32 + 16, 40 = 2 x 16 + 8) and in K (96 = 64 + 32, 200 = 3 x 64 + 8); split 3
# of K = 96 in 32-chunks gives one chunk each, split 4 of K = 96 in 64-chunks leaves two
# splits with an empty K range (they store zeros and still count in).
CONFIGS = [gemv.GemvConfig(block_n=16, block_k=32, split_k=1),
           gemv.GemvConfig(block_n=16, block_k=32, split_k=3),
           gemv.GemvConfig(block_n=32, block_k=64, split_k=2),
           gemv.GemvConfig(block_n=16, block_k=64, split_k=4)]
SHAPES = [(48, 96), (40, 200), (160, 256)]


def zero_counters(n: int = 64) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_plain_matches_f_linear(dtype, n, k, with_bias):
    x, w, b, _ = operands(1, n, k, dtype)
    bias = b if with_bias else None
    want = F.linear(x, w, bias)
    for cfg in [None] + CONFIGS:
        counters = zero_counters()
        got = gemv.gemv_linear(x, w, bias, config=cfg, counters=counters)
        assert got.shape == (1, n) and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol(dtype))
        assert int(counters.abs().sum()) == 0, cfg


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_rms_norm_prologue_matches_norm_then_linear(dtype, n, k):
    x, w, b, nw = operands(1, n, k, dtype, seed=10)
    want = F.linear(torch_norm(x, nw), w, b)
    for cfg in CONFIGS:
        got = gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, config=cfg,
                               counters=zero_counters())
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_residual_epilogue_rounds_like_an_add_after_the_matmul(dtype):
    """round(round(x @ W^T + b) + residual): bitwise the plain kernel's output + residual in
    the dtype, for each config (the same config sums in the same order)."""
    x, w, b, _ = operands(1, 48, 96, dtype, seed=20)
    residual = operands(1, 48, 96, dtype, seed=21)[0][:, :48].contiguous()
    for cfg in CONFIGS:
        plain = gemv.gemv_linear(x, w, b, config=cfg, counters=zero_counters())
        got = gemv.gemv_linear(x, w, b, residual=residual, config=cfg, counters=zero_counters())
        assert torch.equal(got, (plain.float() + residual.float()).to(dtype)), cfg


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_up_epilogue_equals_silu_and_mul_of_the_plain_output(dtype, with_bias):
    """W = [gate; up] (2I, K): silu(gate) * up, bitwise fused_kernels' SiLU·mul of the plain
    kernel's (1, 2I) output; with the norm prologue too (how llama_skinny launches it)."""
    x, w, b, nw = operands(1, 2 * 40, 200, dtype, seed=30)
    bias = b if with_bias else None
    for cfg in CONFIGS:
        for norm in (None, nw):
            plain = gemv.gemv_linear(x, w, bias, norm_weight=norm, eps=EPS, config=cfg,
                                     counters=zero_counters())
            got = gemv.gemv_linear(x, w, bias, norm_weight=norm, eps=EPS, gate_up=True,
                                   config=cfg, counters=zero_counters())
            assert got.shape == (1, 40)
            assert torch.equal(got, fk.fused_silu_and_mul(plain)), (cfg, norm is None)


def test_counters_none_allocates_and_short_counters_are_refused():
    x, w, b, _ = operands(1, 48, 96, torch.float32, seed=40)
    cfg = gemv.GemvConfig(block_n=16, block_k=32, split_k=3)
    torch.testing.assert_close(gemv.gemv_linear(x, w, b, config=cfg), F.linear(x, w, b),
                               **tol(torch.float32))
    assert gemv.counter_tiles(48, False, cfg) == 3 and gemv.counter_tiles(96, True, cfg) == 3
    with pytest.raises(ValueError, match=r"counters must be an int32 vector of >= 3 zeros"):
        gemv.gemv_linear(x, w, b, config=cfg, counters=zero_counters(2))
    with pytest.raises(ValueError, match=r"counters must be an int32 vector"):
        gemv.gemv_linear(x, w, b, config=cfg, counters=torch.zeros(8, dtype=torch.int64))


def test_more_than_one_row_and_bad_configs_are_refused():
    x, w, _, _ = operands(2, 48, 96, torch.float32)
    with pytest.raises(ValueError, match=r"gemv_linear computes one row, got x of shape \(2, 96\)"):
        gemv.gemv_linear(x, w)
    with pytest.raises(ValueError, match="must be a power of two, got 24"):
        gemv.GemvConfig(block_n=24)
    with pytest.raises(ValueError, match=r"split_k must be an int in 1..16, got 17"):
        gemv.GemvConfig(split_k=17)
    with pytest.raises(ValueError, match="pdl=True needs CUDA tensors"):
        gemv.gemv_linear(x[:1], w, pdl=True)


def test_pick_config_covers_the_1b_decode_shapes():
    """The table for the 1B shape (N_w x K), as measured in stop 17: no split on any shape;
    gate_up's two accumulators get 8 warps; a K below the tile's shrinks the tile (the tiny
    test models)."""
    picks = {name: gemv.pick_config(n, k, name == "gate_up") for name, (n, k) in {
        "qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048),
        "down": (2048, 8192), "lm_head": (128256, 2048)}.items()}
    assert {name: (c.block_n, c.block_k, c.num_warps, c.split_k, c.num_stages)
            for name, c in picks.items()} == {
        "qkv": (16, 512, 4, 1, 3), "o_proj": (16, 512, 4, 1, 3), "gate_up": (16, 512, 8, 1, 3),
        "down": (16, 512, 4, 1, 3), "lm_head": (16, 512, 4, 1, 3)}
    assert gemv.pick_config(512, 128, gate_up=True) == gemv.GemvConfig(
        block_n=16, block_k=128, num_warps=8, split_k=1)
    assert gemv.pick_config(128, 8) == gemv.GemvConfig(block_n=16, block_k=16, split_k=1)
