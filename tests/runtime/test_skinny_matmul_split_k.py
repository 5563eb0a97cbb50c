"""layers/skinny_matmul.py with SkinnyConfig.split_k > 1 (partial sums per K range into an fp32
workspace, then the fixed-order reduce kernel with the epilogue), on CPU under the Triton
interpreter in float32 / float16.

- every prologue / epilogue combination against the unfused torch path and against the
  one-pass kernel (close: only the float32 summation order differs), with K not a multiple of
  split_k * BLOCK_K and a masked N tail;
- bitwise: a split whose partner splits are empty equals the one-pass kernel exactly (the
  reduce applies the very same epilogue), the residual / gate_up epilogues round like the
  plain split output + add / SiLU·mul, and rows are batch invariant;
- the launcher's buffers come back NaN-filled (poisoned_empty): a workspace element that no
  split program wrote would surface as NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from llmbatch.runtime.layers import fused_kernels as fk  # noqa: E402
from llmbatch.runtime.layers import skinny_matmul as sm  # noqa: E402
from llmbatch.runtime.layers.activation import SiluAndMul  # noqa: E402
from tests.runtime.test_skinny_matmul import (CPU_DTYPES, EPS, operands,  # noqa: E402
                                              rand, tol, torch_norm)

# K = 150: 5 chunks of 32 (the last one 22 long); split 2 -> ranges of 96 (3 chunks) + 54,
# split 3 -> 64 + 64 + 22. N = 48: one full 32-column tile and a masked one.
K, N = 150, 48


def tiles(split_k: int, block_n: int = 32) -> sm.SkinnyConfig:
    return sm.SkinnyConfig(block_n=block_n, block_k=32, num_warps=4, num_stages=2,
                           split_k=split_k)


def reference(x, w, b, nw, residual, gate_up):
    """The unfused torch chain in the dtype: RMSNorm, F.linear, SiLU·mul, residual add."""
    y = F.linear(torch_norm(x, nw) if nw is not None else x, w, b)
    if gate_up:
        y = SiluAndMul()(y)
    return y + residual if residual is not None else y


def combo_kwargs(x, b, nw, residual, norm, epilogue, with_bias):
    kwargs = dict(bias=b if with_bias else None, gate_up=epilogue == "gate_up")
    if norm:
        kwargs.update(norm_weight=nw, eps=EPS)
    if epilogue == "residual":
        kwargs["residual"] = residual
    return kwargs


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("norm", [False, True], ids=["", "norm"])
@pytest.mark.parametrize("epilogue", ["plain", "residual", "gate_up"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_every_combination_matches_reference_and_one_pass(dtype, split_k, norm, epilogue,
                                                          with_bias):
    m = 3
    n_w = 2 * N if epilogue == "gate_up" else N
    x, w, b, nw = operands(m, n_w, K, dtype, seed=split_k)
    residual = rand((m, N), dtype, 7, 3.0)
    kwargs = combo_kwargs(x, b, nw, residual, norm, epilogue, with_bias)
    got = sm.skinny_linear(x, w, config=tiles(split_k), **kwargs)
    assert got.shape == (m, N) and got.dtype == dtype
    want = reference(x, w, kwargs["bias"], kwargs.get("norm_weight"), kwargs.get("residual"),
                     kwargs["gate_up"])
    torch.testing.assert_close(got, want, **tol(dtype))
    one_pass = sm.skinny_linear(x, w, config=tiles(1), **kwargs)
    torch.testing.assert_close(got, one_pass, **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("norm", [False, True], ids=["", "norm"])
@pytest.mark.parametrize("epilogue", ["plain", "residual", "gate_up"])
def test_empty_splits_leave_the_one_pass_result_bitwise(dtype, norm, epilogue):
    """K = 30 fits one 32-chunk: split 0 holds the whole sum, splits 1 and 2 store zeros, so the
    reduce sees (0 + p0) + 0 + 0 == p0 and must round exactly like the one-pass epilogue."""
    m, k = 4, 30
    n_w = 2 * N if epilogue == "gate_up" else N
    x, w, b, nw = operands(m, n_w, k, dtype, seed=11)
    residual = rand((m, N), dtype, 12, 3.0)
    kwargs = combo_kwargs(x, b, nw, residual, norm, epilogue, with_bias=True)
    got = sm.skinny_linear(x, w, config=tiles(3), **kwargs)
    assert torch.equal(got, sm.skinny_linear(x, w, config=tiles(1), **kwargs))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_split_epilogues_round_like_the_unfused_ops(dtype):
    m, i = 5, 32  # i a multiple of block_n: up rows at the same tile positions in both calls
    x, w, b, _ = operands(m, 2 * i, K, dtype, seed=20)
    cfg = tiles(3, block_n=16)
    residual = rand((m, 2 * i), dtype, 21, 3.0)
    plain = sm.skinny_linear(x, w, b, config=cfg)
    assert torch.equal(sm.skinny_linear(x, w, b, residual=residual, config=cfg),
                       plain + residual)
    assert torch.equal(sm.skinny_linear(x, w, b, gate_up=True, config=cfg),
                       fk.fused_silu_and_mul(plain))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("split_k", [2, 3])
def test_split_rows_are_batch_invariant(dtype, split_k):
    """Row r of an M = 16 call equals the M = r + 1 call and a call whose other rows differ
    (the workspace layout depends on M; the arithmetic on a row must not)."""
    x, w, b, nw = operands(16, 2 * N, K, dtype, seed=30)
    other = rand((16, K), dtype, 31, 5.0)
    residual = rand((16, 2 * N), dtype, 32)
    cfg = tiles(split_k)
    for kwargs in (dict(bias=b, norm_weight=nw, eps=EPS, gate_up=True),
                   dict(residual=residual)):
        full = sm.skinny_linear(x, w, config=cfg, **kwargs)
        for r in (0, 9, 15):
            prefix = dict(kwargs)
            if "residual" in prefix:
                prefix["residual"] = residual[:r + 1]
            assert torch.equal(sm.skinny_linear(x[:r + 1], w, config=cfg, **prefix)[r], full[r])
            mixed = other.clone()
            mixed[r] = x[r]
            assert torch.equal(sm.skinny_linear(mixed, w, config=cfg, **kwargs)[r], full[r])


def test_workspace_is_one_fp32_partial_per_split(monkeypatch):
    """(split_k, M, N_w) float32, allocated per call (CUDA-graph pools serve it in capture)."""
    shapes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        shapes.append((tuple(t.shape), t.dtype))
        return t

    monkeypatch.setattr(sm.torch, "empty", recording_empty)
    x, w, _, _ = operands(3, 2 * N, K, torch.float16, seed=40)
    sm.skinny_linear(x, w, gate_up=True, config=tiles(3))
    assert shapes == [((3, N), torch.float16), ((3, 3, 2 * N), torch.float32)]
    shapes.clear()
    sm.skinny_linear(x, w, config=tiles(1))
    assert shapes == [((3, 2 * N), torch.float16)]  # one pass: no workspace


def test_default_table_stays_one_pass():
    for n, k in ((2048, 2048), (3072, 2048), (8192, 2048), (2048, 8192), (128256, 2048)):
        assert sm.pick_config(n, k, torch.bfloat16).split_k == 1


@pytest.mark.parametrize("split_k", [0, -2, sm.MAX_SPLIT_K + 1, 2.0, True, "2"])
def test_bad_split_k_raises(split_k):
    with pytest.raises(ValueError, match=r"split_k must be an int in 1\.\.32"):
        sm.SkinnyConfig(split_k=split_k)
