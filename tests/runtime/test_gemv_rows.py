"""layers/gemv_rows.py (gemv_linear with 2..8 rows) on CPU under the Triton interpreter, float32
and float16: against torch's unfused path (F.linear, RMSNorm, fused SiLU·mul, the residual add)
within the tolerances of tests/runtime/test_gemv.py, and each row against gemv_linear of that
row alone (the one-row kernel: another summation order, so to rounding, not bitwise). Ragged N
and K tails, split-K (empty last splits included), counters left zero, outputs poisoned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from llmbatch.runtime.layers import fused_kernels as fk  # noqa: E402
from llmbatch.runtime.layers import gemv  # noqa: E402
from tests.runtime.test_gemv import CONFIGS, zero_counters  # noqa: E402
from tests.runtime.test_skinny_matmul import (CPU_DTYPES, EPS, operands, tol,  # noqa: E402
                                              torch_norm)

ROWS = (2, 3, 5, 8)   # padded to 2, 4, 8, 8
# None: the table's multi-row pick (one K chunk at these K); split 3 of K = 200 in 32-chunks
# (3 chunks a split); split 4 of K = 96 in 64-chunks (two empty splits).
ROW_CONFIGS = [None, CONFIGS[1], CONFIGS[3]]


def _each_row_alone(x, w, **kw):
    """gemv_linear of each row of x by itself, the one-row kernel: (M, N)."""
    res = kw.pop("residual", None)
    return torch.cat([gemv.gemv_linear(x[i:i + 1], w, counters=zero_counters(), **kw,
                                       **({} if res is None else dict(residual=res[i:i + 1])))
                      for i in range(x.shape[0])])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_plain_bias_and_norm_match_torch_and_the_one_row_kernel(dtype, m):
    """F.linear (after torch's RMSNorm for the norm prologue: each row its own rstd, row 1
    scaled 8x so a shared one would be wrong), and gemv_linear of each row alone."""
    for n, k in ((48, 96), (40, 200)):
        x, w, b, nw = operands(m, n, k, dtype, seed=m)
        x[1] *= 8.0
        for kw in ({}, dict(bias=b), dict(bias=b, norm_weight=nw, eps=EPS)):
            xn = torch_norm(x, nw) if "norm_weight" in kw else x
            want, alone = F.linear(xn, w, kw.get("bias")), _each_row_alone(x, w, **kw)
            for cfg in ROW_CONFIGS:
                counters = zero_counters()
                got = gemv.gemv_linear(x, w, config=cfg, counters=counters, **kw)
                assert got.shape == (m, n) and got.dtype == dtype
                torch.testing.assert_close(got, want, **tol(dtype))
                torch.testing.assert_close(got, alone, **tol(dtype))
                assert not counters.any(), cfg


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m", (5,))
def test_epilogues_are_torchs_ops_on_the_plain_output(dtype, m):
    """Bitwise, on the multi-row plain output (same kernel, same summation order): the
    residual add in the dtype (residual rows strided: a slice of a wider tensor, for
    res_row_stride) and fused_kernels' SiLU·mul of W = [gate; up]; with and without the norm
    prologue and bias; the gate_up output also against torch's unfused chain."""
    x, w, b, nw = operands(m, 2 * 40, 200, dtype, seed=30)
    residual = operands(m, 96, 96, dtype, seed=31)[0][:, :80]
    for cfg in ROW_CONFIGS:
        for bias, norm in ((None, nw), (b, None)):
            kw = dict(norm_weight=norm, eps=EPS, config=cfg)
            plain = gemv.gemv_linear(x, w, bias, counters=zero_counters(), **kw)
            res = gemv.gemv_linear(x, w, bias, residual=residual, counters=zero_counters(), **kw)
            assert torch.equal(res, (plain.float() + residual.float()).to(dtype)), cfg
            got = gemv.gemv_linear(x, w, bias, gate_up=True, counters=zero_counters(), **kw)
            assert got.shape == (m, 40)
            assert torch.equal(got, fk.fused_silu_and_mul(plain)), (cfg, norm is None)
            want = fk.fused_silu_and_mul(F.linear(x if norm is None else torch_norm(x, norm),
                                                  w, bias))
            torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("config", [None, CONFIGS[1]], ids=["table", "split3"])
def test_float32_out_is_the_rounded_output_upcast(config):
    x, w, b, _ = operands(5, 48, 96, torch.float16)
    counters = zero_counters()
    want = gemv.gemv_linear(x, w, b, config=config, counters=counters).float()
    got = gemv.gemv_linear(x, w, b, config=config, counters=counters, out_dtype=torch.float32)
    assert got.shape == (5, 48) and got.dtype == torch.float32 and torch.equal(got, want)
    assert not counters.any()


@pytest.mark.usefixtures("poisoned_empty")
def test_weight_prefetch_is_bitwise_the_plain_loop():
    """PREFETCH_W peels the first iteration onto the prefetched tile: same sums, same bits."""
    x, w, b, nw = operands(5, 2 * 40, 200, torch.float32, seed=50)
    for cfg in (None, CONFIGS[3]):
        for kw in (dict(bias=b), dict(norm_weight=nw, eps=EPS, gate_up=True)):
            off = gemv.gemv_linear(x, w, config=cfg, counters=zero_counters(), prefetch=False,
                                   **kw)
            on = gemv.gemv_linear(x, w, config=cfg, counters=zero_counters(), prefetch=True,
                                  **kw)
            assert torch.equal(on, off), (cfg, kw.keys())


def test_row_counts_outside_1_to_8_are_refused():
    w = operands(1, 48, 96, torch.float32)[1]
    for m in (0, 9, 16):
        with pytest.raises(ValueError, match=rf"gemv_linear computes 1..8 rows, got x of shape "
                                             rf"\({m}, 96\)"):
            gemv.gemv_linear(torch.zeros(m, 96), w)
    assert gemv.GEMV_MAX_ROWS == 8


def test_multi_row_tiles_leave_the_one_row_table_alone():
    """rows > 1 caps the tile at 8 x 512 and takes 8 warps (registers: gemv_config); rows = 1
    is the table's row as before."""
    for n_w, k, gate_up in ((3072, 2048, False), (2048, 2048, False), (16384, 2048, True),
                            (2048, 8192, False), (128256, 2048, False)):
        one = gemv.pick_config(n_w, k, gate_up)
        assert gemv.pick_config(n_w, k, gate_up, 1) == one
        many = gemv.pick_config(n_w, k, gate_up, 8)
        assert (many.block_n, many.block_k, many.num_warps) == (8, 512, 8)
        assert (many.split_k, many.num_stages) == (one.split_k, one.num_stages)
