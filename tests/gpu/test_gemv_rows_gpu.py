"""layers/gemv_rows.py (gemv_linear with 2..8 rows, stop 20) compiled on CUDA in bfloat16: the
CPU tests run it in the interpreter in float32/float16 only. Each fused option against torch,
each row against the one-row kernel, split-K bitwise deterministic across runs (concurrent
splits on a GPU), a layer chain with PDL and the weight prefetches in a CUDA graph bitwise the
eager chain, and the engine's greedy tokens with gemv_max_rows 8 equal to the unfused path's."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.layers import gemv  # noqa: E402
from tests.gpu.test_gemv_gpu import (assert_options_match_torch,  # noqa: E402
                                     counters_are_zero, norm_gate_up_down_norm)
from tests.gpu.test_skinny_matmul_gpu import (BF16_TOL, I, K,  # noqa: E402
                                              assert_graph_replays_bitwise, cuda_operands,
                                              greedy_outputs)
from tests.runtime.test_skinny_matmul import EPS, rand  # noqa: E402

SPLIT4 = gemv.GemvConfig(block_n=8, block_k=512, num_warps=8, split_k=4)


def counters() -> torch.Tensor:
    return torch.zeros(4096, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("m", [2, 5, 8])
@pytest.mark.parametrize("cfg", [None, SPLIT4], ids=["table", "split4"])
def test_rows_match_torch_and_the_one_row_kernel_bf16(m, cfg):
    x, w, b, nw = cuda_operands(m, 2 * I, seed=20 + m)
    residual = rand((m, 2 * I), torch.bfloat16, 30 + m).cuda()
    c = counters()
    assert_options_match_torch(x, w, b, nw, residual, cfg, c)
    plain = gemv.gemv_linear(x, w, b, config=cfg, counters=c)
    for r in range(m):   # another summation order than the one-row kernel: not bitwise
        torch.testing.assert_close(plain[r:r + 1], gemv.gemv_linear(x[r:r + 1], w, b,
                                                                    counters=c), **BF16_TOL)
    torch.cuda.synchronize()
    assert int(c.abs().sum()) == 0


def test_split_k_rows_are_deterministic_across_runs():
    x, w, b, nw = cuda_operands(5, 2 * I, seed=41)
    c = counters()
    first = gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, config=SPLIT4, counters=c)
    for _ in range(30):
        assert torch.equal(gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, config=SPLIT4,
                                            counters=c), first)
    torch.cuda.synchronize()
    assert int(c.abs().sum()) == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_row_chain_in_a_pdl_graph_replays_bitwise(prefetch):
    """norm + gate_up, down with the residual, a norm prologue: 5 rows (a k = 4 verify step),
    captured with PDL (and the first-tile weight prefetch), each replay bitwise the eager chain
    without either."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    x, w, b, nw = cuda_operands(5, 2 * I, seed=43)
    w_down = rand((K, I), torch.bfloat16, 44, I ** -0.5).cuda()
    c = counters()

    def chain(on):
        return norm_gate_up_down_norm(x, w, b, nw, w_down, counters=c, pdl=on,
                                      prefetch=on and prefetch)

    assert_graph_replays_bitwise(chain, True, lambda: counters_are_zero(c))


def test_engine_greedy_equal_with_gemv_max_rows_8(tmp_path_factory):
    # 12 prompts at up to 8 sequences: decode steps of 2..8 tokens on the multi-row kernel.
    default, rows8 = greedy_outputs(
        tmp_path_factory, [{}, dict(skinny_gemv=True, gemv_max_rows=8)], max_num_seqs=8)
    assert rows8 == default
