"""layers/skinny_matmul.py compiled on CUDA in bfloat16 (the CPU tests run float32/float16 in the
interpreter): each fused option against the unfused torch path on a Llama-1B-like K, and full
batch invariance, which the interpreter cannot show: row r of an M = 16 call bitwise equal to
the M = 1 call on that row (moved to tile position 0), for every row, also with split-K.
Then the engine end to end (tiny float32 Llama, triton attention, fused kernels, decode CUDA
graphs): greedy tokens with EngineConfig.skinny_matmul on equal to off (decode steps of <= 8
tokens take the fused path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.layers import skinny_matmul as sm  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbatch.runtime.layers.activation import SiluAndMul  # noqa: E402
from tests.runtime.test_skinny_matmul import EPS, operands, rand, torch_norm  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer  # noqa: E402

K, N, I = 2048, 1536, 768  # 1B hidden size; fewer output rows than the model to keep it quick
BF16_TOL = dict(atol=2e-2, rtol=1.6e-2)  # one bfloat16 rounding step


def cuda_operands(m, n_w, seed=0):
    return [t.cuda() for t in operands(m, n_w, K, torch.bfloat16, seed)]


@pytest.mark.parametrize("m", [1, 7, 16])
def test_fused_options_match_torch_bf16(m):
    x, w, b, nw = cuda_operands(m, 2 * I, seed=m)
    residual = rand((m, 2 * I), torch.bfloat16, 5).cuda()
    torch.testing.assert_close(sm.skinny_linear(x, w, b), F.linear(x, w, b), **BF16_TOL)
    torch.testing.assert_close(sm.skinny_linear(x, w, norm_weight=nw, eps=EPS),
                               F.linear(torch_norm(x.cpu(), nw.cpu()).cuda(), w), **BF16_TOL)
    got = sm.skinny_linear(x, w, residual=residual)
    assert torch.equal(got, sm.skinny_linear(x, w) + residual)
    got = sm.skinny_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True)
    want = SiluAndMul()(F.linear(torch_norm(x.cpu(), nw.cpu()).cuda(), w, b))
    torch.testing.assert_close(got, want, **BF16_TOL)


def check_rows_match_single_row_calls(full, x, w, residual, cfg, kwargs) -> None:
    """Batch invariance: every row of `full`, the M-row call, is bitwise its own M = 1 call."""
    for r in range(x.shape[0]):
        one = dict(kwargs)
        if "residual" in one:
            one["residual"] = residual[r:r + 1]
        got = sm.skinny_linear(x[r:r + 1], w, config=cfg, **one)
        assert torch.equal(got[0], full[r]), (list(kwargs), r)


@pytest.mark.parametrize("dot", [True, False])
def test_every_row_is_batch_invariant_bf16(dot):
    x, w, b, nw = cuda_operands(16, N, seed=3)
    residual = rand((16, N), torch.bfloat16, 4).cuda()
    cfg = None if dot else sm.SkinnyConfig(block_n=16, block_k=32, num_stages=3, dot=False)
    for kwargs in (dict(bias=b), dict(norm_weight=nw, eps=EPS), dict(residual=residual),
                   dict(norm_weight=nw, eps=EPS, gate_up=True)):
        full = sm.skinny_linear(x, w, config=cfg, **kwargs)
        check_rows_match_single_row_calls(full, x, w, residual, cfg, kwargs)


@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_split_k_matches_one_pass_and_is_batch_invariant_bf16(split_k):
    """The split-K sweep configs (bench_skinny_matmul.split_k_configs): close to the one-pass
    kernel (fp32 summation order only), identical on a rerun (no atomics), and every row of
    an M = 16 call bitwise equal to its M = 1 call."""
    x, w, b, nw = cuda_operands(16, 2 * I, seed=6)
    residual = rand((16, 2 * I), torch.bfloat16, 7).cuda()
    cfg = sm.SkinnyConfig(block_n=16, block_k=256, num_stages=4, split_k=split_k)
    for kwargs in (dict(bias=b, norm_weight=nw, eps=EPS), dict(residual=residual),
                   dict(bias=b, norm_weight=nw, eps=EPS, gate_up=True)):
        full = sm.skinny_linear(x, w, config=cfg, **kwargs)
        torch.testing.assert_close(full, sm.skinny_linear(x, w, **kwargs), **BF16_TOL)
        assert torch.equal(full, sm.skinny_linear(x, w, config=cfg, **kwargs))
        check_rows_match_single_row_calls(full, x, w, residual, cfg, kwargs)


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90+")
@pytest.mark.parametrize("split_k", [1, 4])
def test_pdl_chain_bitwise_equal_in_a_cuda_graph(split_k):
    """Three dependent launches (norm + gate_up, then down with the residual epilogue, then a
    norm prologue reading that residual), captured in a CUDA graph with pdl on: bitwise the
    eager pdl-off result (a missing griddepcontrol.wait would read stale activations)."""
    x, w, b, nw = cuda_operands(16, 2 * I, seed=9)
    w_down = rand((K, I), torch.bfloat16, 10, I ** -0.5).cuda()
    cfg = sm.SkinnyConfig(block_n=16, block_k=256, num_stages=4, split_k=split_k)

    def chain(pdl):
        act = sm.skinny_linear(x, w, b, norm_weight=nw, eps=EPS, gate_up=True, config=cfg,
                               pdl=pdl)
        res = sm.skinny_linear(act, w_down, residual=x, config=cfg, pdl=pdl)
        return sm.skinny_linear(res, w, norm_weight=nw, eps=EPS, config=cfg, pdl=pdl)

    assert_graph_replays_bitwise(chain, True)


def assert_graph_replays_bitwise(chain, pdl: bool, after_each=lambda: None) -> None:
    """chain(pdl) -> a tensor: captured in a CUDA graph (compiled outside the capture first),
    replayed 3 times into a NaN-filled output, each replay bitwise the eager pdl-off result;
    after_each() runs its own checks after every replay."""
    want = chain(False)
    chain(pdl)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(pdl)
    for _ in range(3):
        got.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        after_each()


def greedy_outputs(tmp_path_factory, variants: list[dict], max_num_seqs: int = 8) -> list:
    """Greedy tokens of 12 prompts on a tiny float32 Llama (triton attention, fused kernels,
    decode CUDA graphs) for each EngineConfig override dict in `variants`."""
    path = tmp_path_factory.mktemp("llama-skinny")
    make_model(path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok-skinny"))
    prompts = make_prompts(12, seed=5)
    outputs = []
    for overrides in variants:
        # Every option explicit (skinny_gemv and pdl default on since stop 17): {} is the
        # unfused engine without PDL.
        overrides = dict(dict(skinny_gemv=False, pdl=False), **overrides)
        engine = Engine(EngineConfig(model=str(path), device="cuda", dtype="float32",
                                     attention_backend="triton", max_num_seqs=max_num_seqs,
                                     kv_cache_blocks=1024, **overrides), tokenizer=tokenizer)
        model = engine.runner.model.model
        assert model.use_skinny_matmul is (overrides.get("skinny_matmul", False)
                                           or overrides["skinny_gemv"])
        # skinny_gemv engaged: the model holds its arrival counters (llama_skinny)
        assert ((getattr(model, "skinny_gemv_counters", None) is not None)
                is overrides["skinny_gemv"])
        assert getattr(model, "skinny_pdl", False) is overrides["pdl"]
        # gemv_max_rows reached the model (else 2..8-token steps would silently run unfused)
        assert getattr(model, "skinny_gemv_max_rows", 1) == overrides.get("gemv_max_rows", 1)
        assert engine.runner.cuda_graph_error is None  # the graphs were captured (and checked)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        done = {r.request_id: r for r in
                engine.generate([Request(i, p, params) for i, p in enumerate(prompts)])}
        outputs.append([done[i].output_token_ids for i in range(len(prompts))])
    return outputs


def test_engine_greedy_equal_with_skinny_matmul(tmp_path_factory):
    off, on = greedy_outputs(tmp_path_factory, [{}, dict(skinny_matmul=True)])
    assert on == off


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm_90+")
def test_engine_greedy_equal_with_pdl(tmp_path_factory):
    """EngineConfig.pdl: the skinny kernels overlap their launch with the previous kernel
    inside the decode graphs; every skinny launch waits (griddepcontrol) before it reads an
    activation, so the float32 tokens are those of skinny_matmul alone."""
    alone, pdl = greedy_outputs(tmp_path_factory, [dict(skinny_matmul=True),
                                                   dict(skinny_matmul=True, pdl=True)])
    assert pdl == alone
