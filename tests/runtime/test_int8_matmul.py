"""The w8a16 Triton GEMM (layers/int8_matmul.py) on CPU under the Triton interpreter
(tests/conftest.py switches it on when there is no CUDA), in float32 and float16 (bfloat16 is
unreliable in the interpreter): against the float64 product and the dequantize-then-F.linear
fallback, leading dims, empty batches, bad inputs, batch invariance, and a tiny int8 Llama
whose logits must not change when its linear layers switch to the kernel.

Shapes are small (the interpreter is slow) and N, K are not multiples of any tile, so the
masked tails are exercised; M covers each of the three tile buckets (<= 16, <= 64, larger).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("triton")
# On a CUDA machine (no interpreter) tests/gpu/test_int8_matmul_gpu.py covers the kernel; it
# imports this module's helpers, so the module must import there: skip by marker, not at import.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs CPU tensors under TRITON_INTERPRET=1")

from llmbatch.runtime.layers import int8_matmul as im  # noqa: E402

N, K = 70, 90
CPU_DTYPES = (torch.float32, torch.float16)
# Kernel vs the float64 product: float32 accumulation differs from it by a few float32 ulps of
# the ~10-sized sums; float16 adds one rounding of the output (half an ulp: 2**-11 relative).
TOL_EXACT = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3)}
# Kernel vs the fallback in float16, which also rounds the dequantized weight and the matmul.
TOL_FALLBACK = {torch.float32: dict(atol=5e-5, rtol=1e-5),
                torch.float16: dict(atol=3e-2, rtol=1e-2)}


def make_weight(n: int = N, k: int = K, seed: int = 0):
    """(qweight (n, k) int8 in [-127, 127] with every row reaching +-127, qscale (n,) float32)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q[:, 0] = 127  # a row's absmax maps to 127, as bitsandbytes' vector-wise quantizer does
    return q, torch.rand(n, generator=g) + 0.05


def rand(shape, dtype, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def exact(x, q, s, bias=None) -> torch.Tensor:
    """float64 x @ (q * s / 127)^T + bias."""
    y = x.double() @ (q.double() * (s.double() / 127.0)[:, None]).T
    return y if bias is None else y + bias.double()


def fallback(x, q, s, bias=None) -> torch.Tensor:
    """What BnbLinearMethod.apply computes without the kernel: F.linear of the weight
    dequantized to x's dtype."""
    w = q.to(x.dtype) * (s / 127.0).to(x.dtype).unsqueeze(1)
    return torch.nn.functional.linear(x, w, bias)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m", (1, 5, 17, 64, 130))
@pytest.mark.parametrize("with_bias", (False, True))
def test_matches_reference(dtype, m, with_bias, poisoned_empty):
    q, s = make_weight()
    x = rand((m, K), dtype)
    bias = rand((N,), dtype, seed=2) if with_bias else None
    got = im.int8_linear(x, q, s, bias)
    assert got.shape == (m, N) and got.dtype == dtype
    assert not got.isnan().any()  # every element written (torch.empty is NaN-poisoned here)
    torch.testing.assert_close(got.double(), exact(x, q, s, bias), **TOL_EXACT[dtype])
    torch.testing.assert_close(got, fallback(x, q, s, bias), **TOL_FALLBACK[dtype])


def test_leading_dims_and_empty_batches():
    q, s = make_weight()
    x = rand((2, 3, K), torch.float32)
    got = im.int8_linear(x, q, s)
    assert got.shape == (2, 3, N)
    # Six rows either way, the same tile bucket: bitwise the 2-D call.
    assert torch.equal(got.view(6, N), im.int8_linear(x.view(6, K), q, s))
    for shape in ((0, K), (2, 0, K)):
        out = im.int8_linear(torch.empty(shape), q, s, torch.zeros(N))
        assert out.shape == (*shape[:-1], N) and out.dtype == torch.float32


def test_tile_table():
    assert [im.tile_for(m).block_m for m in (1, 16, 17, 64, 65, 8192)] == [16, 16, 64, 64,
                                                                          128, 128]
    for tile in im.all_tiles():  # tl.dot needs every dimension >= 16
        assert min(tile.block_m, tile.block_n, tile.block_k) >= 16


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rows_do_not_depend_on_other_rows(dtype):
    """Bitwise: a row's result does not change with the rows after it or with M, as long as M
    stays in the same tile bucket (17..64 here; 1..16 for the M=1 case)."""
    q, s = make_weight()
    x = rand((64, K), dtype)
    big = im.int8_linear(x, q, s)
    assert torch.equal(im.int8_linear(x[:40], q, s), big[:40])
    assert torch.equal(im.int8_linear(x[:17], q, s), big[:17])
    other = x.clone()
    other[40:] = rand((24, K), dtype, seed=9)
    assert torch.equal(im.int8_linear(other, q, s)[:40], big[:40])
    assert torch.equal(im.int8_linear(x[:1], q, s), im.int8_linear(x[:16], q, s)[:1])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_row_r_of_a_batch_vs_the_single_row_call(dtype):
    """Row r of an M-row call vs the M=1 call on row r (where the row sits at tile position 0).
    Within the <= 16 bucket float16 is bitwise; float32 only close, because the interpreter's
    float32 tl.dot is numpy's BLAS sgemm, whose summation order depends on a row's position in
    the tile. Across buckets the K tile (so the float32 grouping of the K sum) differs: close.
    On GPU, MMA instructions also differ between buckets (mma.sync at 16, wgmma at 64+)."""
    q, s = make_weight()
    x = rand((64, K), dtype)
    tile16, big = im.int8_linear(x[:16], q, s), im.int8_linear(x, q, s)
    for r in (0, 5, 11, 15):
        single = im.int8_linear(x[r:r + 1], q, s)[0]
        if dtype == torch.float16:
            assert torch.equal(single, tile16[r])
        torch.testing.assert_close(single, tile16[r], **TOL_EXACT[dtype])
    for r in (0, 31, 63):
        torch.testing.assert_close(im.int8_linear(x[r:r + 1], q, s)[0], big[r],
                                   **TOL_EXACT[dtype])


def bad_inputs():
    """(label, args override, exception type, message fragment)."""
    q, s = make_weight()
    x = rand((3, K), torch.float32)
    return [
        ("x int", dict(x=x.to(torch.int32)), ValueError, "x dtype"),
        ("x not a tensor", dict(x=[[1.0] * K]), TypeError, "x must be a torch.Tensor"),
        ("x wrong K", dict(x=rand((3, K + 1), torch.float32)), ValueError, "last dim 90"),
        ("x 0-d", dict(x=torch.tensor(1.0)), ValueError, "last dim 90"),
        ("x strided", dict(x=rand((K, 3), torch.float32).T), ValueError, "x must be contiguous"),
        ("qweight float", dict(qweight=q.float()), ValueError, "int8 tensor"),
        ("qweight 1-d", dict(qweight=q.view(-1)), ValueError, "int8 tensor"),
        ("qweight empty", dict(qweight=q[:0]), ValueError, "is empty"),
        ("qweight strided", dict(qweight=q.T.contiguous().T), ValueError,
         "qweight must be contiguous"),
        ("qscale half", dict(qscale=s.half()), ValueError, "qscale must be (70,) float32"),
        ("qscale short", dict(qscale=s[:-1]), ValueError, "qscale must be (70,) float32"),
        ("bias dtype", dict(bias=torch.zeros(N, dtype=torch.float16)), ValueError,
         "bias must be (70,) torch.float32"),
        ("bias shape", dict(bias=torch.zeros(N + 1)), ValueError, "bias must be (70,)"),
        ("bias list", dict(bias=[0.0] * N), TypeError, "bias must be a torch.Tensor"),
        ("qscale on meta", dict(qscale=torch.empty(N, device="meta")), ValueError,
         "qscale is on meta"),
    ], dict(x=x, qweight=q, qscale=s, bias=None)


@pytest.mark.parametrize("case", range(len(bad_inputs()[0])),
                         ids=[c[0] for c in bad_inputs()[0]])
def test_bad_inputs_raise(case):
    cases, args = bad_inputs()
    _, override, exc, fragment = cases[case]
    with pytest.raises(exc, match=re.escape(fragment)):
        im.int8_linear(**{**args, **override})


def test_tiny_llama_int8_logits_through_the_kernel(llama_setup, monkeypatch):
    """The same int8 model, prefill logits through the dequantize path and then through the
    kernel (forced on: ModelRunner only enables it on CUDA), agree to float32 rounding."""
    pytest.importorskip("bitsandbytes")
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.layers.quantization import enable_triton_int8
    from llmbatch.runtime.model_runner import ModelRunner
    from tests.runtime.test_quantization import prefill_logits

    path, _ = llama_setup
    r = ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                 quantization="int8", kv_cache_blocks=16))
    prompts = [[5, 17, 99, 3, 250, 41, 7], [8, 8, 300, 12]]
    want = prefill_logits(r, prompts)

    calls = []
    real = im.int8_linear
    monkeypatch.setattr(im, "int8_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    # 2 layers x (qkv, o_proj, gate_up, down).
    assert enable_triton_int8(r.model) == 8
    got = prefill_logits(r, prompts)
    assert calls == [(11, 64), (11, 64), (11, 64), (11, 128)] * 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
