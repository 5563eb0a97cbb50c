"""runtime/kernel_paths.py and the quantized Triton GEMMs (int8, nf4): the start-up check that
turns a wrong kernel off, tensor-parallel ranks agreeing on it, nf4's GEMM opt-in.

The other kernel paths (fused kernels, skinny matmul / gemv, PDL, prefetch): test_kernel_paths.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import check_quant_kernel, disable_triton, enable_kernel_paths


def _int8_runner(llama_setup):
    pytest.importorskip("bitsandbytes")
    from llmbatch.runtime.model_runner import ModelRunner

    path, _ = llama_setup
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    quantization="int8", kv_cache_blocks=16))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the kernel on CPU tensors under TRITON_INTERPRET=1")
def test_int8_start_up_check_passes_the_real_kernel(llama_setup):
    from llmbatch.runtime.layers.quantization import enable_triton_int8

    runner = _int8_runner(llama_setup)
    assert enable_triton_int8(runner.model) == 8
    assert check_quant_kernel(runner.model, "int8", row_counts=(1, 20)) is None


@pytest.mark.parametrize("broken,reason", [
    (lambda x, w, s, b: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype), "exceeds"),
    (lambda x, w, s, b: torch.full((x.shape[0], w.shape[0]), float("nan")), "exceeds"),
    (lambda x, w, s, b: (_ for _ in ()).throw(RuntimeError("no kernel image")),
     "RuntimeError: no kernel image"),
])
def test_int8_start_up_check_catches_a_wrong_kernel(llama_setup, monkeypatch, broken, reason):
    from llmbatch.runtime.layers import int8_matmul
    from llmbatch.runtime.layers.quantization import enable_triton_int8

    runner = _int8_runner(llama_setup)
    enable_triton_int8(runner.model)
    monkeypatch.setattr(int8_matmul, "int8_linear", broken)
    assert_check_catches_and_disables(runner.model, "int8", reason)


def assert_check_catches_and_disables(model, method: str, reason: str) -> None:
    """check_quant_kernel names the (monkeypatched) wrong `method` kernel at its first row
    count, and disable_triton, what kernel_paths does with a reason, leaves no layer on the
    Triton GEMM. Shared with test_nf4_matmul."""
    why = check_quant_kernel(model, method)
    assert why is not None and reason in why and why.startswith("1 rows:")
    disable_triton(model, method)
    assert not any(getattr(getattr(m, "quant_method", None), "use_triton", False)
                   for m in model.modules())


@pytest.mark.parametrize("per_rank,layers,error", [
    ([1, 1], 1, None),     # every rank's check passed: the kernel stays on
    ([1, 0], 0, "off on every rank: rank 1's start-up check failed (its log says why)"),
])
def test_tensor_parallel_ranks_agree_on_the_quantized_gemm(per_rank, layers, error):
    """A start-up check that failed on one rank only turns the GEMM off on every rank (else
    ranks would compute their shares differently while rank 0's stats said "on")."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from llmbatch.runtime.kernel_paths import agree_across_ranks
    from llmbatch.runtime.layers.linear import RowParallelLinear
    from llmbatch.runtime.layers.quantization import BnbLinearMethod, enable_triton_nf4

    layer = RowParallelLinear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.normal_()
    quant = layer.quant_method = BnbLinearMethod("nf4")
    quant.process_weights_after_loading(layer)
    model = nn.Sequential(layer)
    runner = SimpleNamespace(model=model, int8_triton_layers=0, int8_triton_error=None,
                             nf4_triton_layers=enable_triton_nf4(model), nf4_triton_error=None)
    gathered = []
    agree_across_ranks(runner, lambda v: gathered.append(v) or ([0, 0] if not gathered[1:]
                                                                 else per_rank))
    assert gathered == [0, 1]   # int8 then nf4: the same collectives on every rank
    assert (runner.nf4_triton_layers, runner.nf4_triton_error, quant.use_triton) == \
        (layers, error, bool(layers))
    assert (runner.int8_triton_layers, runner.int8_triton_error) == (0, None)


@pytest.mark.parametrize("opt_in", (False, True))
def test_nf4_triton_gemm_is_opt_in(opt_in):
    """nf4 layers keep bitsandbytes unless nf4_triton_gemm is set (the Triton GEMM measured
    slower on an H200); with it, the start-up check runs and the layer switches. The CUDA
    branch runs here on CPU tensors, the kernel under the Triton interpreter."""
    pytest.importorskip("bitsandbytes")
    from llmbatch.runtime.layers.linear import RowParallelLinear
    from llmbatch.runtime.layers.quantization import BnbLinearMethod

    torch.manual_seed(0)
    layer = RowParallelLinear(64, 16, bias=False)
    with torch.no_grad():   # the parameter is torch.empty: fill it, or the check may see NaN
        layer.weight.normal_()
    quant = layer.quant_method = BnbLinearMethod("nf4")
    quant.process_weights_after_loading(layer)
    config = EngineConfig(model="m", quantization="nf4", nf4_triton_gemm=opt_in)
    paths = enable_kernel_paths(nn.Sequential(layer), config, torch.device("cuda"), 1, "nf4")
    assert (paths.fused_kernels, paths.nf4_triton_layers, paths.nf4_triton_error) == \
        (True, int(opt_in), None)
    assert quant.use_triton is opt_in
