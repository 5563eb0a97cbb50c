"""The w4a16 Triton GEMM (layers/nf4_matmul.py) on CPU under the Triton interpreter, in float32
and float16 (bfloat16 is unreliable in the interpreter). The oracle is bitsandbytes' own CPU
dequantize_4bit of the same flat nf4 quantization: the kernel must match F.linear of that
weight. Also: the nibble order the kernel assumes, leading dims, empty batches, bad inputs,
batch invariance inside a tile bucket, BnbLinearMethod.apply's dispatch (and its fallback for
in_features not a multiple of 64), a tiny nf4 Llama (LM head quantized too) whose logits do not
change when its layers switch to the kernel, and the start-up check of runtime/kernel_paths.py.

K is a multiple of 64 (the launcher requires it) but not of every BLOCK_K (256, 128), and N is
not a multiple of any BLOCK_N, so the masked tails run; M covers the three tile buckets.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
# On a CUDA machine (no interpreter) tests/gpu/test_nf4_matmul_gpu.py covers the kernel and
# imports this module's helpers: skip by marker, not at import.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs CPU tensors under TRITON_INTERPRET=1")

from llmbatch.runtime.layers import nf4_matmul as nm  # noqa: E402

CPU_DTYPES = (torch.float32, torch.float16)
# Kernel vs the float64 product of the dequantized weight: float32 accumulation is off by a few
# float32 ulps of the ~10-sized sums; float16 also rounds the weight and the output once.
TOL_EXACT = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.float16: dict(atol=2e-2, rtol=1e-2)}
# Kernel vs the fallback (F.linear of the weight dequantized to x's dtype) in float16: both
# round the weight identically; they differ in the float16 matmul's own rounding.
TOL_FALLBACK = {torch.float32: dict(atol=5e-5, rtol=1e-5),
                torch.float16: dict(atol=3e-2, rtol=1e-2)}


class Nf4Weight:
    """A flat nf4 quantization of a random (n, k) weight, as quantization.quantize_nf4 stores
    it, and its bitsandbytes-dequantized float32 (n, k) matrix (the oracle)."""

    def __init__(self, n: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * 0.5
        self.qweight, self.state = bnb_functional.quantize_4bit(
            w.reshape(-1), blocksize=64, quant_type="nf4", compress_statistics=False)
        self.n, self.k = n, k
        self.dense = bnb_functional.dequantize_4bit(self.qweight, self.state).view(n, k)

    def args(self):
        return (self.qweight, self.state.absmax, self.state.code, self.n, self.k)

    def linear(self, x, bias=None):
        return nm.nf4_linear(x, *self.args(), bias)


def rand(shape, dtype, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def exact(x, weight: Nf4Weight, bias=None) -> torch.Tensor:
    y = x.double() @ weight.dense.double().T
    return y if bias is None else y + bias.double()


def fallback(x, weight: Nf4Weight, bias=None) -> torch.Tensor:
    return F.linear(x, weight.dense.to(x.dtype), bias)


def test_high_nibble_is_the_even_element():
    """The layout nf4_matmul reads: byte j = elements 2j (bits 7..4) and 2j+1 (bits 3..0),
    each code[nibble] * absmax[e // 64], exactly bitsandbytes' dequantize."""
    w = Nf4Weight(6, 64)
    b = w.qweight.view(-1).long()
    nibbles = torch.stack([b >> 4, b & 15], dim=1).view(-1)
    rebuilt = w.state.code[nibbles] * w.state.absmax.repeat_interleave(64)
    assert torch.equal(rebuilt.view(6, 64), w.dense)
    swapped = torch.stack([b & 15, b >> 4], dim=1).view(-1)
    assert not torch.equal(w.state.code[swapped], w.state.code[nibbles])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,k,ms", [(70, 192, (1, 5, 17, 64)), (33, 64, (1, 17)),
                                    (40, 320, (5, 130))])
def test_matches_bitsandbytes_dequantize(dtype, n, k, ms, poisoned_empty):
    weight = Nf4Weight(n, k)
    for m in ms:
        x = rand((m, k), dtype, seed=m)
        bias = rand((n,), dtype, seed=2) if m % 2 else None  # odd M with bias, even without
        got = weight.linear(x, bias)
        assert got.shape == (m, n) and got.dtype == dtype
        assert not got.isnan().any()  # every element written (torch.empty is NaN-poisoned)
        torch.testing.assert_close(got.double(), exact(x, weight, bias), **TOL_EXACT[dtype])
        torch.testing.assert_close(got, fallback(x, weight, bias), **TOL_FALLBACK[dtype])


def test_leading_dims_and_empty_batches():
    weight = Nf4Weight(70, 128)
    x = rand((2, 3, 128), torch.float32)
    got = weight.linear(x)
    assert got.shape == (2, 3, 70)
    # Six rows either way, the same tile bucket: bitwise the 2-D call.
    assert torch.equal(got.view(6, 70), weight.linear(x.view(6, 128)))
    for shape in ((0, 128), (2, 0, 128)):
        out = weight.linear(torch.empty(shape), torch.zeros(70))
        assert out.shape == (*shape[:-1], 70) and out.dtype == torch.float32


def test_tile_table():
    assert [nm.tile_for(m).block_m for m in (1, 16, 17, 64, 65, 8192)] == [16, 16, 64, 64,
                                                                          128, 128]
    for tile in nm.all_tiles():  # each half-dot has K = BLOCK_K / 2, and tl.dot needs >= 16
        assert min(tile.block_m, tile.block_n, tile.block_k // 2) >= 16


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rows_do_not_depend_on_other_rows(dtype):
    """Bitwise, inside one tile bucket (17..64 here; 1..16 for the single-row case)."""
    weight = Nf4Weight(70, 192)
    x = rand((64, 192), dtype)
    big = weight.linear(x)
    assert torch.equal(weight.linear(x[:40]), big[:40])
    assert torch.equal(weight.linear(x[:17]), big[:17])
    other = x.clone()
    other[40:] = rand((24, 192), dtype, seed=9)
    assert torch.equal(weight.linear(other)[:40], big[:40])
    assert torch.equal(weight.linear(x[:1]), weight.linear(x[:16])[:1])


def bad_inputs():
    """(label, args override, exception type, message fragment)."""
    w = Nf4Weight(70, 128)
    x = rand((3, 128), torch.float32)
    return [
        ("x int", dict(x=x.to(torch.int32)), ValueError, "x dtype"),
        ("x not a tensor", dict(x=[[1.0] * 128]), TypeError, "x must be a torch.Tensor"),
        ("x wrong K", dict(x=rand((3, 192), torch.float32)), ValueError, "last dim 128"),
        ("x 0-d", dict(x=torch.tensor(1.0)), ValueError, "last dim 128"),
        ("x strided", dict(x=rand((128, 3), torch.float32).T), ValueError,
         "x must be contiguous"),
        ("K not whole blocks", dict(in_features=96, x=rand((3, 96), torch.float32)),
         ValueError, "in_features 96 is not a multiple of 64"),
        ("N zero", dict(out_features=0), ValueError, "out_features must be a positive int"),
        ("N float", dict(out_features=70.0), ValueError, "out_features must be a positive int"),
        ("qweight int8", dict(qweight=w.qweight.view(torch.int8)), ValueError,
         "qweight must hold 4480 uint8 bytes"),
        ("qweight short", dict(qweight=w.qweight[:-1]), ValueError, "qweight must hold 4480"),
        ("qabsmax half", dict(qabsmax=w.state.absmax.half()), ValueError,
         "qabsmax must hold 140 float32"),
        ("code short", dict(code=w.state.code[:8]), ValueError, "code must be the (16,)"),
        ("bias shape", dict(bias=torch.zeros(71)), ValueError, "bias must be (70,)"),
        ("bias list", dict(bias=[0.0] * 70), TypeError, "bias must be a torch.Tensor"),
        ("code on meta", dict(code=torch.empty(16, device="meta")), ValueError,
         "code is on meta"),
        ("qabsmax strided", dict(qabsmax=torch.zeros(280)[::2]), ValueError,
         "qabsmax must be contiguous"),
    ], dict(x=x, qweight=w.qweight, qabsmax=w.state.absmax, code=w.state.code,
            out_features=70, in_features=128, bias=None)


@pytest.mark.parametrize("label", [case[0] for case in bad_inputs()[0]])
def test_bad_inputs_raise(label):
    cases, args = bad_inputs()
    override, exc, fragment = next(case[1:] for case in cases if case[0] == label)
    with pytest.raises(exc, match=re.escape(fragment)):
        nm.nf4_linear(**{**args, **override})


@pytest.mark.parametrize("k,uses_kernel", [(128, True), (96, False)])
def test_apply_dispatch(monkeypatch, k, uses_kernel):
    """BnbLinearMethod.apply with use_triton: the kernel for in_features % 64 == 0, the
    dequantize path otherwise (no error); the same values either way."""
    from llmbatch.runtime.layers.linear import RowParallelLinear
    from llmbatch.runtime.layers.quantization import BnbLinearMethod

    layer = RowParallelLinear(k, 48, bias=True)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    quant = layer.quant_method = BnbLinearMethod("nf4")
    quant.process_weights_after_loading(layer)
    x = rand((5, k), torch.float32)
    want = quant.apply(layer, x, layer.bias)
    calls = []
    real = nm.nf4_linear
    monkeypatch.setattr(nm, "nf4_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    quant.use_triton = True
    got = quant.apply(layer, x, layer.bias)
    assert calls == ([(5, k)] if uses_kernel else [])
    torch.testing.assert_close(got, want, **TOL_FALLBACK[torch.float32])


def test_enable_counts_only_layers_that_take_the_kernel():
    """nf4_triton_layers (engine stats) counts the layers apply runs on the kernel: one whose
    in_features is not a multiple of 64 keeps bitsandbytes and is not counted; a model with
    only such layers reports 0 (so kernel_paths runs no check and claims no Triton layer)."""
    from llmbatch.runtime.layers.linear import RowParallelLinear
    from llmbatch.runtime.layers.quantization import BnbLinearMethod, enable_triton_nf4

    quant = BnbLinearMethod("nf4")
    layers = []
    for k in (128, 96, 64):
        layer = RowParallelLinear(k, 48, bias=False)
        layer.quant_method = quant
        quant.process_weights_after_loading(layer)
        layers.append(layer)
    assert enable_triton_nf4(torch.nn.Sequential(*layers)) == 2
    assert enable_triton_nf4(torch.nn.Sequential(layers[1])) == 0


def _nf4_runner(llama_setup, **kw):
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.model_runner import ModelRunner

    path, _ = llama_setup
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    quantization="nf4", kv_cache_blocks=16, **kw))


def test_tiny_llama_nf4_logits_through_the_kernel(llama_setup, monkeypatch):
    """One nf4 model (LM head quantized too), prefill logits through the fallback and then
    through the kernel (forced on: kernel_paths only enables it on CUDA)."""
    from llmbatch.runtime.layers.quantization import enable_triton_nf4
    from tests.runtime.test_quantization import prefill_logits

    r = _nf4_runner(llama_setup, quantize_embeddings=True)
    prompts = [[5, 17, 99, 3, 250, 41, 7], [8, 8, 300, 12]]
    want = prefill_logits(r, prompts)
    calls = []
    real = nm.nf4_linear
    monkeypatch.setattr(nm, "nf4_linear", lambda *a: calls.append((a[0].shape, a[4])) or real(*a))
    # 2 layers x (qkv, o_proj, gate_up, down) + the LM head (the embedding has no GEMM).
    assert enable_triton_nf4(r.model) == 9
    got = prefill_logits(r, prompts)
    assert calls == [((11, 64), 128), ((11, 64), 64), ((11, 64), 256), ((11, 128), 64)] * 2 \
        + [((11, 64), 384)]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_start_up_check_passes_the_real_kernel(llama_setup):
    from llmbatch.runtime.kernel_paths import check_quant_kernel
    from llmbatch.runtime.layers.quantization import enable_triton_nf4

    runner = _nf4_runner(llama_setup)
    assert enable_triton_nf4(runner.model) == 8
    assert check_quant_kernel(runner.model, "nf4", row_counts=(1, 20)) is None


@pytest.mark.parametrize("broken,reason", [
    (lambda x, q, a, c, n, k, b: torch.zeros(x.shape[0], n, dtype=x.dtype), "exceeds"),
    # A swapped nibble order: the other element of each byte (what a layout bug would do).
    (lambda x, q, a, c, n, k, b: F.linear(x, _swapped_dense(q, a, c, n, k)), "exceeds"),
    (lambda x, q, a, c, n, k, b: (_ for _ in ()).throw(RuntimeError("no kernel image")),
     "RuntimeError: no kernel image"),
])
def test_start_up_check_catches_a_wrong_kernel(llama_setup, monkeypatch, broken, reason):
    from llmbatch.runtime.layers.quantization import enable_triton_nf4, triton_gemm_modules
    from tests.runtime.test_kernel_paths_quant import assert_check_catches_and_disables

    runner = _nf4_runner(llama_setup)
    enable_triton_nf4(runner.model)
    monkeypatch.setattr(nm, "nf4_linear", broken)
    assert_check_catches_and_disables(runner.model, "nf4", reason)
    assert [q.use_triton for _, q in triton_gemm_modules(runner.model, "nf4")] == [False] * 8


def _swapped_dense(q, absmax, code, n, k):
    b = q.view(-1).long()
    nibbles = torch.stack([b & 15, b >> 4], dim=1).view(-1)
    return (code[nibbles] * absmax.repeat_interleave(64)).view(n, k)


def test_engine_stats_report_the_nf4_path(llama_setup):
    """On CPU no Triton path applies, even for an nf4 engine with fused kernels asked for."""
    from tests.runtime.tiny_models import new_engine

    stats = new_engine(llama_setup, quantization="nf4", fused_kernels=True).stats()
    assert (stats["nf4_triton_layers"], stats["nf4_triton_error"]) == (0, None)
