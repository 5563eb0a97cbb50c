"""layers/gemv.py compiled on CUDA in bfloat16 (the CPU tests run float32/float16 in the
interpreter): each fused option against the unfused torch path on a Llama-1B-like K, and what
only a GPU shows: with split-K the splits of a column tile run concurrently, so the program
that arrives last changes from run to run; the result must still be bitwise identical across
runs (fixed summation order), and the arrival counters zero afterwards, also in a CUDA graph
with PDL, where the weight prefetches before the PDL wait (the first tile, the L2 prefetch of
the slice: inline PTX, tested only here) must change no bit either. Then the engine end to end
(tiny float32 Llama, decode graphs): greedy tokens with skinny_matmul + skinny_gemv equal to the
default path's (one sequence, so every decode step is one token and runs on the gemv
kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.layers import gemv  # noqa: E402
from llmbatch.runtime.layers.activation import SiluAndMul  # noqa: E402
from tests.gpu.test_skinny_matmul_gpu import (BF16_TOL, I, K, N,  # noqa: E402
                                              assert_graph_replays_bitwise, cuda_operands,
                                              greedy_outputs)
from tests.runtime.test_skinny_matmul import EPS, rand, torch_norm  # noqa: E402

SPLITS = [gemv.GemvConfig(block_n=16, block_k=512, split_k=s) for s in (1, 2, 4, 8)]


def counters() -> torch.Tensor:
    return torch.zeros(1024, dtype=torch.int32, device="cuda")


def assert_options_match_torch(x, w, b, nw, residual, cfg, c) -> None:
    """The fused options of gemv_linear on x (M, K) against unfused torch: the plain linear,
    the RMSNorm prologue (each row its own rstd), the residual epilogue (bitwise the plain
    kernel's result + residual) and norm + SiLU·mul. Shared by the one-row and the multi-row
    (test_gemv_rows_gpu) tests."""
    torch.testing.assert_close(gemv.gemv_linear(x, w, b, config=cfg, counters=c),
                               F.linear(x, w, b), **BF16_TOL)
    normed = torch_norm(x.cpu(), nw.cpu()).cuda()
    torch.testing.assert_close(gemv.gemv_linear(x, w, norm_weight=nw, eps=EPS, config=cfg,
                                                counters=c), F.linear(normed, w), **BF16_TOL)
    got = gemv.gemv_linear(x, w, residual=residual, config=cfg, counters=c)
    assert torch.equal(got, gemv.gemv_linear(x, w, config=cfg, counters=c) + residual)
    got = gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True, config=cfg,
                           counters=c)
    torch.testing.assert_close(got, SiluAndMul()(F.linear(normed, w, b)), **BF16_TOL)


@pytest.mark.parametrize("cfg", [None] + SPLITS,
                         ids=lambda c: f"split{c.split_k}" if c else "table")
def test_fused_options_match_torch_bf16(cfg):
    x, w, b, nw = cuda_operands(1, 2 * I, seed=1)
    residual = rand((1, 2 * I), torch.bfloat16, 5).cuda()
    c = counters()
    assert_options_match_torch(x, w, b, nw, residual, cfg, c)
    assert int(c.abs().sum()) == 0


@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_split_k_is_deterministic_across_runs(split_k):
    """Whichever split arrives last, it adds the partials in split order: 50 runs of each
    option bitwise equal, counters back at zero."""
    x, w, b, nw = cuda_operands(1, 2 * I, seed=6)
    residual = rand((1, N), torch.bfloat16, 7).cuda()  # N == 2 I: w's rows
    cfg = gemv.GemvConfig(block_n=16, block_k=256, split_k=split_k)
    c = counters()
    for weight, kwargs in ((w, dict(bias=b, norm_weight=nw, eps=EPS)),
                           (w, dict(residual=residual)),
                           (w, dict(bias=b, norm_weight=nw, eps=EPS, gate_up=True))):
        first = gemv.gemv_linear(x, weight, config=cfg, counters=c, **kwargs)
        for _ in range(50):
            assert torch.equal(gemv.gemv_linear(x, weight, config=cfg, counters=c, **kwargs),
                               first)
    torch.cuda.synchronize()
    assert int(c.abs().sum()) == 0


@pytest.mark.parametrize("pdl", [False, True])
def test_layer_chain_in_a_cuda_graph_replays_bitwise(pdl):
    """norm + gate_up, down with the residual epilogue, a norm prologue reading that residual:
    captured once (pdl on sm_90+ only), replayed 3 times into NaN-filled outputs, each bitwise
    the eager result; the shared counters stay zero between replays."""
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    x, w, b, nw = cuda_operands(1, 2 * I, seed=9)
    w_down = rand((K, I), torch.bfloat16, 10, I ** -0.5).cuda()
    c = counters()
    cfg = gemv.GemvConfig(block_n=16, block_k=512, split_k=4)

    def chain(use_pdl):
        act = gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True, config=cfg,
                               counters=c, pdl=use_pdl)
        res = gemv.gemv_linear(act, w_down, residual=x, config=cfg, counters=c, pdl=use_pdl)
        return gemv.gemv_linear(res, w, norm_weight=nw, eps=EPS, config=cfg, counters=c,
                                pdl=use_pdl)

    def counters_zero():
        assert int(c.abs().sum()) == 0

    assert_graph_replays_bitwise(chain, pdl, counters_zero)


# (prefetch, prefetch_l2): the first weight tile, the L2 prefetch of the slice (inline PTX, so
# only compiled here), both.
PREFETCHES = {"tile": (True, False), "l2": (False, True), "tile+l2": (True, True)}


@pytest.mark.parametrize("mode", list(PREFETCHES))
@pytest.mark.parametrize("cfg", [None, SPLITS[2]],
                         ids=lambda c: f"split{c.split_k}" if c else "table")
def test_weight_prefetch_chain_in_a_pdl_graph_equals_prefetch_off(cfg, mode):
    """The same layer chain with the weight prefetches before the PDL wait (the first tile
    loaded, the program's weight slice prefetched into L2, or both) captured with PDL: every
    replay bitwise the eager chain with neither prefetch nor PDL."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    x, w, b, nw = cuda_operands(1, 2 * I, seed=11)
    w_down = rand((K, I), torch.bfloat16, 12, I ** -0.5).cuda()
    c = counters()
    prefetch, prefetch_l2 = PREFETCHES[mode]

    def chain(on):
        return norm_gate_up_down_norm(x, w, b, nw, w_down, config=cfg, counters=c, pdl=on,
                                      prefetch=on and prefetch, prefetch_l2=on and prefetch_l2)

    assert_graph_replays_bitwise(chain, True, lambda: counters_are_zero(c))


def norm_gate_up_down_norm(x, w, b, nw, w_down, **kw):
    """A layer's gemv chain: norm + gate_up, down with x as the residual, then a norm
    prologue reading that result; kw go to every gemv_linear call."""
    act = gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True, **kw)
    res = gemv.gemv_linear(act, w_down, residual=x, **kw)
    return gemv.gemv_linear(res, w, norm_weight=nw, eps=EPS, **kw)


def counters_are_zero(c: torch.Tensor) -> None:
    assert int(c.abs().sum()) == 0


def test_engine_greedy_equal_with_skinny_gemv(tmp_path_factory):
    default, gemv_on = greedy_outputs(
        tmp_path_factory, [{}, dict(skinny_matmul=True, skinny_gemv=True)], max_num_seqs=1)
    assert gemv_on == default


@pytest.mark.parametrize("mode", ["off", "tile", "l2", "both"])
def test_lm_head_float32_logits_bitwise_the_upcast_bf16(mode):
    """ParallelLMHead.gemv_logits (F32_OUT: float32 logits rounded to bf16 in the kernel) on
    the 1B head shape equals the bf16 gemv output upcast, bit for bit, in every weight
    prefetch mode (the head's launches read the same switches as the layers)."""
    from llmbatch.runtime.layers.embedding import ParallelLMHead

    head = ParallelLMHead(128256, 2048, params_dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        head.weight.normal_(std=0.02)
    head.use_gemv = True
    hidden = torch.randn(1, 2048, device="cuda").bfloat16()
    gemv.set_prefetch_mode(mode)
    try:
        got = head(hidden)
        want = gemv.gemv_linear(hidden, head.weight).float()
    finally:
        gemv.set_prefetch_mode("off")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(got, F.linear(hidden, head.weight).float(), **BF16_TOL)
