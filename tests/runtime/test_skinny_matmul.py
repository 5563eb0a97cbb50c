"""layers/skinny_matmul.py on CPU under the Triton interpreter (tests/conftest.py switches it on
when there is no CUDA), float32 and float16 (bfloat16 is unreliable in the interpreter).

How outputs are compared:
- against the unfused torch path (RMSNorm module, F.linear in the dtype, SiluAndMul module, add
  in the dtype) within a float32 tolerance or about one rounding step of float16: the float32
  sums (squares, dot products) run in another order;
- bitwise where the kernel must round exactly like the unfused kernels: the residual epilogue
  equals the plain kernel's output + residual, the gate_up epilogue equals fused_silu_and_mul
  of the plain kernel's output, and batch invariance (row r of an M = 16 call equals the M = 1
  call on row r).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from llmbatch.runtime.layers import fused_kernels as fk  # noqa: E402
from llmbatch.runtime.layers import skinny_matmul as sm  # noqa: E402
from llmbatch.runtime.layers.activation import SiluAndMul  # noqa: E402
from llmbatch.runtime.layers.norm import RMSNorm  # noqa: E402

CPU_DTYPES = (torch.float32, torch.float16)
EPS = 1e-5
# Several K chunks and masked tails in both K and N (48 = 32 + 16, 160 = 2 * 64 + 32).
SMALL_TILES = sm.SkinnyConfig(block_n=32, block_k=64, num_warps=4, num_stages=2)
GATE_TILES = sm.SkinnyConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
FMA_TILES = sm.SkinnyConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, dot=False)


def tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=2e-5, rtol=2e-5),
            torch.float16: dict(atol=4e-3, rtol=4e-3)}[dtype]


def rand(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def operands(m: int, n_w: int, k: int, dtype: torch.dtype, seed: int = 0):
    """x (m, k), weight (n_w, k) scaled so outputs are O(1), bias (n_w,), norm weight (k,)."""
    x = rand((m, k), dtype, seed, 2.0)
    w = rand((n_w, k), dtype, seed + 1, k ** -0.5)
    b = rand((n_w,), dtype, seed + 2, 0.5)
    nw = (rand((k,), torch.float32, seed + 3, 0.5) + 1.0).to(dtype)
    return x, w, b, nw


def torch_norm(x: torch.Tensor, nw: torch.Tensor) -> torch.Tensor:
    norm = RMSNorm(x.shape[1], EPS, params_dtype=x.dtype)
    norm.weight.data.copy_(nw)
    return norm(x)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (3, 48, 96), (16, 160, 256), (3, 160, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_plain_matches_f_linear(dtype, m, n, k, with_bias):
    x, w, b, _ = operands(m, n, k, dtype)
    bias = b if with_bias else None
    want = F.linear(x, w, bias)
    for cfg in (None, SMALL_TILES):
        got = sm.skinny_linear(x, w, bias, config=cfg)
        assert got.shape == (m, n) and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 96), (16, 32, 256)])
def test_rms_norm_prologue_matches_norm_then_linear(dtype, m, n, k):
    x, w, b, nw = operands(m, n, k, dtype, seed=10)
    want = F.linear(torch_norm(x, nw), w, b)
    for cfg in (None, SMALL_TILES):
        got = sm.skinny_linear(x, w, b, norm_weight=nw, eps=EPS, config=cfg)
        torch.testing.assert_close(got, want, **tol(dtype))
    # The normalized input itself is rounded like norm.py: with an identity weight the output
    # is exactly the normalized row (one product per output, no summation-order effect).
    eye = torch.eye(k, dtype=dtype)
    got = sm.skinny_linear(x, eye, norm_weight=nw, eps=EPS)
    torch.testing.assert_close(got, torch_norm(x, nw), **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (3, 160, 96), (16, 48, 256)])
def test_residual_epilogue_rounds_like_the_unfused_add(dtype, m, n, k):
    x, w, b, _ = operands(m, n, k, dtype, seed=20)
    residual = rand((m, n), dtype, 99, 3.0)
    for bias, cfg in ((None, None), (b, SMALL_TILES)):
        got = sm.skinny_linear(x, w, bias, residual=residual, config=cfg)
        # Bitwise: the matmul output rounded to the dtype, then one rounded add.
        assert torch.equal(got, sm.skinny_linear(x, w, bias, config=cfg) + residual)
        torch.testing.assert_close(got, F.linear(x, w, bias) + residual, **tol(dtype))


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,i,k", [(1, 32, 64), (3, 48, 96), (16, 80, 256), (2, 40, 96)])
def test_gate_up_epilogue_is_silu_and_mul(dtype, m, i, k):
    x, w, b, _ = operands(m, 2 * i, k, dtype, seed=30)
    for bias, cfg in ((None, None), (b, SMALL_TILES), (b, GATE_TILES)):
        got = sm.skinny_linear(x, w, bias, gate_up=True, config=cfg)
        assert got.shape == (m, i)
        torch.testing.assert_close(got, SiluAndMul()(F.linear(x, w, bias)), **tol(dtype))
        if i % (cfg or sm.pick_config(i, k, dtype)).block_n == 0:
            # Bitwise equal to the unfused kernel chain (same rounding, same exp) when the up
            # rows sit at the same tile positions in both launches (the interpreter's matmul
            # may round a tile's edge columns differently).
            plain = sm.skinny_linear(x, w, bias, config=cfg)
            assert torch.equal(got, fk.fused_silu_and_mul(plain))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_norm_gate_up_as_the_mlp_launches_it(dtype):
    """post_attention_layernorm + gate_up + SiLU·mul in one launch (Qwen-style bias too)."""
    m, i, k = 5, 48, 96
    x, w, b, nw = operands(m, 2 * i, k, dtype, seed=40)
    want = SiluAndMul()(F.linear(torch_norm(x, nw), w, b))
    got = sm.skinny_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True)
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cfg", [None, SMALL_TILES, FMA_TILES], ids=["default", "small", "fma"])
def test_rows_are_batch_invariant(dtype, cfg):
    """A row's output depends on neither M nor the other rows, for every fused option: row r of
    an M = 16 call is bitwise equal to row r of an M = r + 1 call and of a call whose other rows
    hold other data, and row 0 to the M = 1 call. (Moving a row to another tile position is
    not checked here: the interpreter's numpy matmul may round by position; on a GPU every
    row of an MMA runs the same instructions, tests/gpu/test_skinny_matmul_gpu.py checks it.)"""
    k, i = 96, 48
    x, w, b, nw = operands(16, 2 * i, k, dtype, seed=50)
    other = rand((16, k), dtype, 52, 5.0)
    residual = rand((16, 2 * i), dtype, 51)
    calls = (dict(bias=b), dict(norm_weight=nw, eps=EPS, gate_up=True),
             dict(residual=residual))
    for kwargs in calls:
        full = sm.skinny_linear(x, w, config=cfg, **kwargs)
        for r in (0, 7, 15):
            prefix = dict(kwargs)
            if "residual" in prefix:
                prefix["residual"] = residual[:r + 1]
            got = sm.skinny_linear(x[:r + 1], w, config=cfg, **prefix)
            assert torch.equal(got[r], full[r]), (list(kwargs), r)
            mixed = other.clone()
            mixed[r] = x[r]
            got = sm.skinny_linear(mixed, w, config=cfg, **kwargs)
            assert torch.equal(got[r], full[r]), (list(kwargs), r)
            assert not torch.equal(got, full)


def test_fma_tiles_match_dot_tiles():
    x, w, b, nw = operands(4, 96, 96, torch.float32, seed=60)
    torch.testing.assert_close(sm.skinny_linear(x, w, b, norm_weight=nw, config=FMA_TILES),
                               sm.skinny_linear(x, w, b, norm_weight=nw), atol=2e-5, rtol=2e-5)


def test_strided_x_and_residual_rows():
    """x and residual may be row-strided views (e.g. a slice of a wider buffer)."""
    x, w, _, _ = operands(3, 32, 64, torch.float32, seed=70)
    wide = torch.zeros(3, 100)
    wide[:, :64] = x
    res_wide = rand((3, 50), torch.float32, 71)
    got = sm.skinny_linear(wide[:, :64], w, residual=res_wide[:, :32])
    assert torch.equal(got, sm.skinny_linear(x, w) + res_wide[:, :32])


def test_config_table_ignores_m_and_fills_the_gpu():
    for n, k in ((2048, 2048), (3072, 2048), (8192, 2048), (2048, 8192), (128256, 2048)):
        cfg = sm.pick_config(n, k, torch.bfloat16)
        assert cfg.block_m == sm.MAX_M and cfg.block_k <= k
        assert -(-n // cfg.block_n) >= 128  # >= ~one program per SM of a 132-SM H200
    assert sm.pick_config(32, 64, torch.float32).block_k == 64
    assert sm.pick_config(2048, 2048, torch.float32).num_stages <= 2


def test_supported_check():
    x, w, _, _ = operands(3, 32, 64, torch.float32)
    assert sm.skinny_matmul_supported(x, w)
    assert not sm.skinny_matmul_supported(torch.zeros(17, 64), w)
    assert not sm.skinny_matmul_supported(x.half(), w)
    assert not sm.skinny_matmul_supported(x, w.t().contiguous().t())
    assert not sm.skinny_matmul_supported(x[:, :32], w)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: sm.skinny_linear(torch.zeros(17, 64), w), r"1 <= M <= 16"),
    (lambda x, w: sm.skinny_linear(torch.zeros(0, 64), w), r"1 <= M <= 16"),
    (lambda x, w: sm.skinny_linear(torch.zeros(64), w), r"x must be \(M, K\)"),
    (lambda x, w: sm.skinny_linear(x, w.half()), r"must match x"),
    (lambda x, w: sm.skinny_linear(x.int(), w.int()), r"not supported"),
    (lambda x, w: sm.skinny_linear(x, torch.zeros(64, 64).t()), r"weight must be contiguous"),
    (lambda x, w: sm.skinny_linear(x, w[:, :32]), r"weight must be \(N, K=64\)"),
    (lambda x, w: sm.skinny_linear(torch.zeros(3, 128)[:, ::2], w), r"stride\(1\) == 1"),
    (lambda x, w: sm.skinny_linear(x, w[:31].contiguous(), gate_up=True), r"even number"),
    (lambda x, w: sm.skinny_linear(x, w, gate_up=True, residual=torch.zeros(3, 16)),
     r"cannot be combined"),
    (lambda x, w: sm.skinny_linear(x, w, torch.zeros(31)), r"bias must be .*\(32,\)"),
    (lambda x, w: sm.skinny_linear(x, w, norm_weight=torch.zeros(64).half()),
     r"norm_weight must be"),
    (lambda x, w: sm.skinny_linear(x, w, residual=torch.zeros(3, 31)), r"residual must be"),
    (lambda x, w: sm.skinny_linear(x.numpy(), w), r"x must be a torch.Tensor"),
    # The interpreter cannot run griddepcontrol: PDL is refused off CUDA.
    (lambda x, w: sm.skinny_linear(x, w, pdl=True), r"pdl=True needs CUDA tensors"),
    (lambda x, w: sm.SkinnyConfig(block_n=24), r"power of two"),
    (lambda x, w: sm.SkinnyConfig(block_m=8), r"block_m must be >= 16"),
    (lambda x, w: sm.SkinnyConfig(block_n=8), r"block_n and block_k >= 16"),
])
def test_bad_inputs_raise(call, match):
    x, w, _, _ = operands(3, 32, 64, torch.float32)
    with pytest.raises(ValueError, match=match):
        call(x, w)
