"""layers/int8_matmul.py compiled on CUDA (the CPU tests run float32/float16 in the interpreter):
bfloat16/float16 against the float64 product for M in every tile bucket, bitwise batch
invariance inside a bucket, and an int8 engine whose linear layers use the kernel (fused kernels
on) with its decode CUDA graphs captured and verified, logits close to the dequantize path.

Written without a GPU at hand: not yet run on one."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.layers import int8_matmul as im  # noqa: E402
from tests.runtime.test_int8_matmul import exact, make_weight, rand  # noqa: E402

N, K = 1500, 1000  # neither a multiple of any tile
# One rounding of the ~30-sized outputs to the dtype (bfloat16: 2**-8 relative).
TOL = {torch.bfloat16: dict(atol=3e-2, rtol=8e-3), torch.float16: dict(atol=4e-3, rtol=1e-3)}


def cuda_operands(m, dtype, seed=0):
    q, s = make_weight(N, K, seed)
    return rand((m, K), dtype, seed + 1).cuda(), q.cuda(), s.cuda()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("m", (1, 16, 17, 64, 65, 300))
def test_matches_float64_product(dtype, m):
    x, q, s = cuda_operands(m, dtype)
    bias = rand((N,), dtype, 7).cuda()
    got = im.int8_linear(x, q, s, bias)
    torch.testing.assert_close(got.double(), exact(x, q, s, bias), **TOL[dtype])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_bitwise_within_a_tile_bucket(dtype):
    x, q, s = cuda_operands(64, dtype)
    tile16 = im.int8_linear(x[:16], q, s)
    for r in range(16):  # moved to tile position 0 on its own
        assert torch.equal(im.int8_linear(x[r:r + 1], q, s)[0], tile16[r])
    assert torch.equal(im.int8_linear(x[:17], q, s), im.int8_linear(x, q, s)[:17])


def test_int8_engine_uses_the_kernel_under_cuda_graphs(tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.layers.linear import LinearBase
    from llmbatch.runtime.model_runner import ModelRunner
    from tests.runtime.test_quantization import prefill_logits
    from tests.runtime.tiny_models import make_model

    make_model(tmp_path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)

    def runner(fused):
        return ModelRunner(EngineConfig(model=str(tmp_path), device="cuda", dtype="bfloat16",
                                        quantization="int8", attention_backend="triton",
                                        fused_kernels=fused, cuda_graphs=fused,
                                        max_num_seqs=8, kv_cache_blocks=64))

    fused = runner(True)
    linears = [m for m in fused.model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.quant_method.use_triton for m in linears)
    # Captured, and every graph's first replay matched its eager forward (else eager + error).
    assert fused.cuda_graph_error is None and fused.graph_runner is not None
    prompts = [[5, 17, 99, 3, 250, 41, 7], [8, 8, 300, 12]]
    plain = runner(False)
    assert not any(m.quant_method.use_triton for m in plain.model.modules()
                   if isinstance(m, LinearBase))
    torch.testing.assert_close(prefill_logits(fused, prompts), prefill_logits(plain, prompts),
                               atol=1e-1, rtol=5e-2)  # bf16 roundings over 2 layers
