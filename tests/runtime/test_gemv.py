"""layers/gemv.py on CPU under the Triton interpreter, float32 and float16 (bfloat16 is
unreliable in the interpreter), against the unfused torch path within a float32 tolerance or
about one rounding step of float16, and bitwise where the kernel must round exactly like the
unfused kernels (residual and SiLU·mul epilogues on top of the plain kernel's own output).

Split-K: the interpreter runs programs one after another, so the program of the last split is
the one that reduces; the tests check the reduced result, that every output element is written
(poisoned torch.empty), and that the arrival counters are left all zero for the next call.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_more_than_eight_rows_and_bad_configs_are_refused():
    x, w, _, _ = operands(9, 48, 96, torch.float32)
    with pytest.raises(ValueError, match=r"gemv_linear computes 1..8 rows, got x of shape \(9, 96\)"):
        gemv.gemv_linear(x, w)
    with pytest.raises(ValueError, match="must be a power of two, got 24"):
        gemv.GemvConfig(block_n=24)
    with pytest.raises(ValueError, match=r"split_k must be an int in 1..16, got 17"):
        gemv.GemvConfig(split_k=17)
    with pytest.raises(ValueError, match="pdl=True needs CUDA tensors"):
        gemv.gemv_linear(x[:1], w, pdl=True)


# pick_config's table (stop 19's per-shape rows): tests/runtime/test_gemv_tile_table.py.


# Weight prefetch (PREFETCH_W): the first weight tile loaded before the PDL wait, the loop's
# first iteration peeled onto it. Kinds as llama_skinny launches them, plus bias alone and
# gate_up without the norm; the configs have several chunks per split after the peeled one
# (K = 200: split 1 in 32-chunks, split 2 in 64-chunks) and short or empty last splits (K = 96
# in 64-chunks split 4: [0, 64), [64, 96), then two empty ranges; K = 200 split 4: [192, 200)).
PREFETCH_KINDS = {"plain": lambda b, nw, r: {}, "bias": lambda b, nw, r: dict(bias=b),
                  "norm": lambda b, nw, r: dict(bias=b, norm_weight=nw, eps=EPS),
                  "residual": lambda b, nw, r: dict(residual=r),
                  "gate_up": lambda b, nw, r: dict(bias=b, norm_weight=nw, eps=EPS, gate_up=True),
                  "gate_up_no_norm": lambda b, nw, r: dict(gate_up=True)}
PREFETCH_CONFIGS = [gemv.GemvConfig(block_n=16, block_k=32, split_k=1),
                    gemv.GemvConfig(block_n=32, block_k=64, split_k=2),
                    gemv.GemvConfig(block_n=16, block_k=64, split_k=4)]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", list(PREFETCH_KINDS))
def test_weight_prefetch_is_bitwise_the_plain_loop(dtype, kind):
    """prefetch=True vs False: every element written (NaN-poisoned outputs and workspaces) and
    bitwise equal, for every config and shape; the counters left zero."""
    for n, k in ((48, 96), (40, 200)):
        n_w = 2 * n if kind.startswith("gate_up") else n
        x, w, b, nw = operands(1, n_w, k, dtype, seed=50)
        r = operands(1, n, k, dtype, seed=51)[0][:, :n].contiguous()
        kwargs = PREFETCH_KINDS[kind](b, nw, r)
        for cfg in [None] + PREFETCH_CONFIGS:
            counters = zero_counters()
            off = gemv.gemv_linear(x, w, config=cfg, counters=counters, prefetch=False, **kwargs)
            on = gemv.gemv_linear(x, w, config=cfg, counters=counters, prefetch=True, **kwargs)
            assert on.shape == (1, n) and not on.isnan().any(), (n, k, cfg)
            assert torch.equal(on, off), (n, k, cfg)
            assert int(counters.abs().sum()) == 0, (n, k, cfg)


class PrefetchRecorder:
    """Stands in for _gemv_kernel: records each launch's PREFETCH_W and PREFETCH_L2, then runs
    the kernel."""

    def __init__(self, kernel):
        self.kernel, self.prefetch, self.prefetch_l2 = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.prefetch.append(kwargs["PREFETCH_W"])
            self.prefetch_l2.append(kwargs["PREFETCH_L2"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.usefixtures("poisoned_empty")
def test_weight_prefetch_switch_and_keyword_reach_the_launch(monkeypatch):
    """Off by default; set_weight_prefetch turns it on for later launches; prefetch= overrides
    the switch both ways; the result is the same every time."""
    monkeypatch.setattr(gemv, "_weight_prefetch", gemv._weight_prefetch)  # restored afterwards
    rec = PrefetchRecorder(gemv._gemv_kernel)
    monkeypatch.setattr(gemv, "_gemv_kernel", rec)
    x, w, b, nw = operands(1, 48, 96, torch.float32, seed=60)
    cfg = gemv.GemvConfig(block_n=16, block_k=32, split_k=1)

    def call(**kwargs):
        return gemv.gemv_linear(x, w, b, norm_weight=nw, eps=EPS, config=cfg, **kwargs)

    gemv.set_weight_prefetch(False)
    want = call()
    assert gemv.weight_prefetch_enabled() is False
    gemv.set_weight_prefetch(True)
    assert gemv.weight_prefetch_enabled() is True
    results = [call(), call(prefetch=False)]
    gemv.set_weight_prefetch(False)
    results += [call(prefetch=True), call(prefetch=None)]
    assert rec.prefetch == [False, True, False, True, False]
    for got in results:
        assert torch.equal(got, want)


def test_weight_prefetch_is_off_by_default():
    """In a fresh process (this one's tests may have turned the switches on and off): both the
    tile prefetch and the L2 prefetch."""
    code = ("from llmbatch.runtime.layers import gemv; "
            "print(gemv.weight_prefetch_enabled(), gemv.weight_prefetch_l2_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "False False", proc.stderr[-2000:]


# L2 prefetch of the weight slice (PREFETCH_L2): inline PTX, which the interpreter cannot run,
# so on CPU tensors the launcher never sets it, whatever the switch or the keyword say.
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("kind", ["norm", "residual", "gate_up"])
def test_l2_prefetch_is_ignored_on_cpu_tensors(monkeypatch, kind):
    """Switch on, keyword True, with and without the tile prefetch: every launch has
    PREFETCH_L2 False and the result equals the launch with both prefetches off, bitwise."""
    monkeypatch.setattr(gemv, "_weight_prefetch_l2", gemv._weight_prefetch_l2)  # restored
    rec = PrefetchRecorder(gemv._gemv_kernel)
    monkeypatch.setattr(gemv, "_gemv_kernel", rec)
    n, k = 48, 96
    n_w = 2 * n if kind == "gate_up" else n
    x, w, b, nw = operands(1, n_w, k, torch.float32, seed=70)
    r = operands(1, n, k, torch.float32, seed=71)[0][:, :n].contiguous()
    kwargs = PREFETCH_KINDS[kind](b, nw, r)
    cfg = gemv.GemvConfig(block_n=16, block_k=32, split_k=3)
    counters = zero_counters()

    def call(**kw):
        return gemv.gemv_linear(x, w, config=cfg, counters=counters, **kwargs, **kw)

    gemv.set_weight_prefetch_l2(False)
    want = call(prefetch=False, prefetch_l2=False)
    gemv.set_weight_prefetch_l2(True)
    assert gemv.weight_prefetch_l2_enabled() is True
    results = [call(prefetch=False), call(prefetch=True), call(prefetch=False, prefetch_l2=True),
               call(prefetch=True, prefetch_l2=True)]
    assert rec.prefetch_l2 == [False] * 5
    assert rec.prefetch == [False, False, True, False, True]  # the tile prefetch still applies
    for got in results:
        assert torch.equal(got, want)
    assert int(counters.abs().sum()) == 0


def test_l2_prefetch_switch_and_keyword_on_a_cuda_device(monkeypatch):
    """What a CUDA launch would get (resolved without launching, so no GPU needed): the switch,
    the keyword overriding it both ways; never on CPU."""
    monkeypatch.setattr(gemv, "_weight_prefetch_l2", gemv._weight_prefetch_l2)  # restored
    monkeypatch.setattr(torch.version, "hip", None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gemv.set_weight_prefetch_l2(False)
    assert [gemv._l2_prefetch_on(cuda, kw) for kw in (None, False, True)] == [False, False, True]
    gemv.set_weight_prefetch_l2(True)
    assert [gemv._l2_prefetch_on(cuda, kw) for kw in (None, False, True)] == [True, False, True]
    assert [gemv._l2_prefetch_on(cpu, kw) for kw in (None, False, True)] == [False] * 3


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("config", [None, CONFIGS[1]], ids=["table", "split3"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_out_is_the_rounded_output_upcast(config, with_bias):
    """out_dtype=float32 (the LM head's logits): the model-dtype output's values, stored as
    float32 in the same launch -- bitwise gemv_linear(...).float()."""
    x, w, b, _ = operands(1, 48, 96, torch.float16)
    bias = b if with_bias else None
    counters = zero_counters()
    want = gemv.gemv_linear(x, w, bias, config=config, counters=counters).float()
    got = gemv.gemv_linear(x, w, bias, config=config, counters=counters,
                           out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert not counters.any()


def test_float32_out_only_for_plain_calls():
    x, w, _, _ = operands(1, 32, 64, torch.float16)
    with pytest.raises(ValueError, match="out_dtype=torch.float32 is float32 for a plain call"):
        gemv.gemv_linear(x, w, residual=torch.zeros(1, 32, dtype=torch.float16),
                         out_dtype=torch.float32)
    with pytest.raises(ValueError, match="got residual=False, gate_up=True"):
        gemv.gemv_linear(x, w, norm_weight=torch.ones(64, dtype=torch.float16), gate_up=True,
                         out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype=torch.bfloat16"):
        gemv.gemv_linear(x, w, out_dtype=torch.bfloat16)
    same = gemv.gemv_linear(x, w, out_dtype=torch.float16)   # x's dtype: the usual output
    assert same.dtype == torch.float16


def test_lm_head_gemv_logits_are_float32_in_one_launch(monkeypatch):
    """ParallelLMHead on gemv: float32 logits straight from the kernel, equal to the
    model-dtype gemv output upcast (what forward returned before), no separate upcast."""
    from llmbatch.runtime.layers.embedding import ParallelLMHead

    head = ParallelLMHead(96, 64, params_dtype=torch.float16)
    with torch.no_grad():
        head.weight.normal_()
    head.use_gemv = True
    hidden = torch.randn(1, 64).half()
    want = gemv.gemv_linear(hidden, head.weight).float()
    launches = []
    real = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear", lambda *a, **k: launches.append(k) or real(*a, **k))
    got = head(hidden)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert [k.get("out_dtype") for k in launches] == [torch.float32]
