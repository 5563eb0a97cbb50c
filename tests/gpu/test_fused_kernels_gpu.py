"""Fused RMSNorm / SiLU·mul / rotary kernels compiled on CUDA: the CPU cases of
tests/runtime/test_fused_kernels.py in bfloat16, and engine greedy output (triton attention,
decode CUDA graphs on, so the kernels are also captured) with fused_kernels on equal to off
(tiny Llama, float32: every token equal -- the kernels differ
from torch only in the float32 summation order of the norm, far below the tiny model's argmax
margins; a real bug such as an unwritten or misplaced element breaks nearly every sequence).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.conftest import poisoned_empty  # noqa: E402
from tests.runtime.test_fused_kernels import (  # noqa: E402
    HIDDEN_SIZES, NUM_TOKENS, check_rms_norm, check_rotary, check_rotary_store_kv,
    check_silu_and_mul)
from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer  # noqa: E402

# bfloat16 only (float32/float16 run in the interpreter on CPU): each (dtype, block size,
# residual) variant is a Triton compile, and tests/gpu shares gpu_check.sh's pytest budget.
GPU_DTYPES = (torch.bfloat16,)
__all__ = ["poisoned_empty"]  # the fixture, imported so tests here can use it


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS + (1000,))
@pytest.mark.parametrize("hidden", HIDDEN_SIZES + (2048,))
@pytest.mark.parametrize("with_residual", (True, False))
def test_rms_norm_matches_torch_cuda(poisoned_empty, dtype, num_tokens, hidden, with_residual):
    check_rms_norm(num_tokens, hidden, dtype, with_residual, device="cuda")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS + (1000,))
@pytest.mark.parametrize("d", HIDDEN_SIZES + (1500, 8192))
def test_silu_and_mul_matches_torch_cuda(poisoned_empty, dtype, num_tokens, d):
    check_silu_and_mul(num_tokens, d, dtype, device="cuda")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS + (1000,))
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("table", (False, True))
def test_rotary_matches_torch_cuda(poisoned_empty, dtype, num_tokens, head_dim, table):
    check_rotary(num_tokens, head_dim, dtype, device="cuda", table=table)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS + (1000,))
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("table", (False, True))
def test_rotary_store_kv_matches_cuda(dtype, num_tokens, head_dim, table):
    check_rotary_store_kv(num_tokens, head_dim, dtype, device="cuda", table=table)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_rope_table_rows_equal_the_per_step_computation(dtype):
    """On CUDA the table (ModelRunner builds it: layers/rotary.py) holds exactly what cos_sin
    computes for a step, bit for bit, at every position up to the 1B shape's max_model_len."""
    from llmbatch.runtime.layers.rotary import RotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope = RotaryEmbedding(64, 500000.0, scaling).to("cuda")
    positions = torch.cat([torch.arange(0, 131072, device="cuda"),
                           torch.randint(0, 131072, (3001,), device="cuda")])
    want = rope.cos_sin(positions, dtype)
    rope.build_table(131072, dtype)
    got = rope.cos_sin(positions, dtype)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-fused")
    make_model(path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    return path, make_tokenizer(tmp_path_factory.mktemp("tok-fused"))


def run_engine(path, tokenizer, prompts, fused: bool):
    engine = Engine(EngineConfig(model=str(path), device="cuda", dtype="float32",
                                 attention_backend="triton", fused_kernels=fused,
                                 max_num_seqs=8, kv_cache_blocks=1024), tokenizer=tokenizer)
    assert engine.runner.fused_kernels_active is fused
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    results = {r.request_id: r for r in
               engine.generate([Request(i, p, params) for i, p in enumerate(prompts)])}
    return [results[i].output_token_ids for i in range(len(prompts))]


def test_engine_greedy_equal_with_fused_kernels(tiny):
    path, tokenizer = tiny
    prompts = make_prompts(17, seed=3)
    off = run_engine(path, tokenizer, prompts, fused=False)
    on = run_engine(path, tokenizer, prompts, fused=True)
    assert on == off
