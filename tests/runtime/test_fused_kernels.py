"""Fused Triton RMSNorm / SiLU·mul / rotary (layers/fused_kernels.py) vs the torch modules, on
CPU under the Triton interpreter (tests/conftest.py switches it on before collection when there
is no CUDA), in float32 and float16. tests/gpu/test_fused_kernels_gpu.py reuses the case
builders below and runs them compiled on CUDA in bfloat16.

How outputs are compared: the kernels round exactly where the torch modules round. residual_out
(one rounded add) and rotary (no reduction) are bitwise equal; SiLU·mul within one rounding step
(Triton's exp may differ in the last float32 bit); the normalized output, whose float32 sum of
squares is taken in another order, within float32 atol 1e-5 or one rounding step of
float16/bfloat16. Outputs are allocated by the wrappers, so "poisoned" means: torch.empty is
patched to return NaN-filled buffers (fixture below), and any unwritten element shows up.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.layers import fused_kernels as fk  # noqa: E402
from llmbatch.runtime.layers import fused_rotary as fr  # noqa: E402
from llmbatch.runtime.layers.activation import SiluAndMul  # noqa: E402
from llmbatch.runtime.layers.norm import RMSNorm  # noqa: E402
from llmbatch.runtime.layers.rotary import RotaryEmbedding  # noqa: E402

HIDDEN_SIZES = (64, 96, 200)
NUM_TOKENS = (1, 37)
CPU_DTYPES = (torch.float32, torch.float16)  # bfloat16 is unreliable in the interpreter


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=2e-3, rtol=1e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


def make_norm(hidden: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> RMSNorm:
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(hidden, eps=1e-5, params_dtype=dtype)
    norm.weight.data.copy_(torch.randn(hidden, generator=g) * 0.5 + 1.0)
    return norm.to(device)


def rand(shape, dtype, device="cpu", seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype).to(device)


def check_rms_norm(num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool,
                   device: str = "cpu") -> None:
    norm = make_norm(hidden, dtype, device)
    x = rand((num_tokens, hidden), dtype, device, seed=1)
    residual = rand((num_tokens, hidden), dtype, device, seed=2) if with_residual else None
    x_before = x.clone()
    if with_residual:
        want, want_res = norm(x, residual)
        got, got_res = fk.fused_rms_norm(x, norm.weight, norm.eps, residual)
        # One rounded add on both sides: bitwise.
        assert torch.equal(got_res, want_res)
    else:
        want = norm(x)
        got = fk.fused_rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert torch.equal(x, x_before)  # inputs are never written


def check_silu_and_mul(num_tokens: int, d: int, dtype: torch.dtype, device: str = "cpu") -> None:
    x = rand((num_tokens, 2 * d), dtype, device, seed=3)
    want = SiluAndMul()(x)
    got = fk.fused_silu_and_mul(x)
    assert got.dtype == want.dtype and got.shape == want.shape == (num_tokens, d)
    assert not got.isnan().any()
    # No reduction, same roundings; Triton's exp may differ from torch's in the last float32
    # bit, which can move a half-precision result by one rounding step (relative 2^-10 / 2^-7).
    rtol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=rtol)


def check_rotary(num_tokens: int, head_dim: int, dtype: torch.dtype, device: str = "cpu",
                 table: bool = False) -> None:
    """q, k as strided views of one fused qkv row (as llama.py makes them), 4 q / 2 kv heads,
    positions up to 5000 (large angles). table: cos/sin are views of a gather from the rope
    table (row stride head_dim, not contiguous), as on CUDA."""
    num_heads, num_kv_heads = 4, 2
    rope = RotaryEmbedding(head_dim, 10000.0).to(device)
    if table:
        rope.build_table(5000, dtype)
    positions = torch.randint(0, 5000, (num_tokens,),
                              generator=torch.Generator().manual_seed(7)).to(device)
    qkv = rand((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), dtype, device, seed=8)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    cos, sin = rope.cos_sin(positions, dtype)
    assert cos.stride(0) == (head_dim if table else head_dim // 2)   # table rows: cos|sin
    want_q, want_k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
    got_q, got_k = fr.fused_rotary(q, k, cos, sin)
    assert not got_q.isnan().any() and not got_k.isnan().any()
    # Same roundings at every op, no reduction: bitwise.
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("with_residual", (True, False))
def test_rms_norm_matches_torch(poisoned_empty, dtype, num_tokens, hidden, with_residual):
    check_rms_norm(num_tokens, hidden, dtype, with_residual)


def check_rotary_store_kv(num_tokens: int, head_dim: int, dtype: torch.dtype,
                          device: str = "cpu", block_size: int = 16, table: bool = False
                          ) -> None:
    """fused_rotary_store_kv == rotate q and k, then TorchAttentionBackend.write_kv: q and every
    stored K/V row bit for bit; slots never written stay NaN; a -1 slot (graph padding) writes
    nothing. q, k, v are strided views of one fused qkv row, as llama.py makes them."""
    from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend

    num_heads, num_kv_heads = 4, 2
    rope = RotaryEmbedding(head_dim, 10000.0).to(device)
    if table:   # cos/sin: strided views of the table gather (check_rotary)
        rope.build_table(5000, dtype)
    positions = torch.randint(0, 5000, (num_tokens,),
                              generator=torch.Generator().manual_seed(7)).to(device)
    qkv = rand((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), dtype, device, seed=9)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    cos, sin = rope.cos_sin(positions, dtype)
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size,
                           generator=torch.Generator().manual_seed(5))[:num_tokens]
    if num_tokens > 1:
        slots[num_tokens // 2] = -1                    # a padding row
    slots = slots.to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    want_k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    want_v_cache = want_k_cache.clone()
    got_k_cache, got_v_cache = want_k_cache.clone(), want_v_cache.clone()

    want_q, want_k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
    TorchAttentionBackend().write_kv(want_k, v, want_k_cache, want_v_cache, slots)
    got_q = fr.fused_rotary_store_kv(q, k, v, cos, sin, got_k_cache, got_v_cache, slots)
    assert torch.equal(got_q, want_q)
    # NaN == NaN for the slots neither side wrote.
    assert torch.equal(got_k_cache.nan_to_num(7.0), want_k_cache.nan_to_num(7.0))
    assert torch.equal(got_v_cache.nan_to_num(7.0), want_v_cache.nan_to_num(7.0))
    written = int((~got_k_cache.isnan()).all(dim=(2, 3)).sum())
    assert written == int((slots >= 0).sum())


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("table", (False, True))
def test_rotary_store_kv_matches_rotate_then_write_kv(dtype, num_tokens, head_dim, table):
    check_rotary_store_kv(num_tokens, head_dim, dtype, table=table)


def test_rotary_store_kv_rejects_a_bad_cache():
    x = torch.zeros(3, 2, 8)
    cos = torch.zeros(3, 1, 4)
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        fr.fused_rotary_store_kv(x, x[:, :1], x[:, :1], cos, cos, torch.zeros(2, 4, 2, 8),
                                 torch.zeros(2, 4, 2, 8), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("d", HIDDEN_SIZES + (1500,))  # 1500: two column tiles, ragged tail
def test_silu_and_mul_matches_torch(poisoned_empty, dtype, num_tokens, d):
    check_silu_and_mul(num_tokens, d, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("head_dim", (64, 96, 128))
@pytest.mark.parametrize("table", (False, True))
def test_rotary_matches_torch(poisoned_empty, dtype, num_tokens, head_dim, table):
    check_rotary(num_tokens, head_dim, dtype, table=table)


def test_rms_norm_float32_weight_on_float16_input_promotes_like_torch():
    norm = make_norm(96, torch.float32)
    x = rand((5, 96), torch.float16)
    got, want = fk.fused_rms_norm(x, norm.weight, norm.eps), norm(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_leading_dims_and_zero_tokens():
    norm = make_norm(64, torch.float32)
    x = rand((2, 3, 64), torch.float32)
    torch.testing.assert_close(fk.fused_rms_norm(x, norm.weight, norm.eps), norm(x),
                               atol=1e-5, rtol=1e-5)
    empty = torch.empty(0, 64)
    out, res = fk.fused_rms_norm(empty, norm.weight, norm.eps, empty)
    assert out.shape == res.shape == (0, 64)
    assert fk.fused_silu_and_mul(torch.empty(0, 8)).shape == (0, 4)


def test_modules_take_the_fused_path_only_when_flagged(monkeypatch):
    norm, act = make_norm(96, torch.float32), SiluAndMul()
    x, r = rand((7, 96), torch.float32, seed=4), rand((7, 96), torch.float32, seed=5)
    want, want_res = norm(x, r)
    want_act = act(x)
    calls = []
    real_norm, real_act = fk.fused_rms_norm, fk.fused_silu_and_mul
    monkeypatch.setattr(fk, "fused_rms_norm", lambda *a: calls.append("norm") or real_norm(*a))
    monkeypatch.setattr(fk, "fused_silu_and_mul", lambda x: calls.append("act") or real_act(x))
    norm(x, r), act(x)
    assert calls == []  # default off: the torch path
    norm.use_fused_kernel = act.use_fused_kernel = True
    got, got_res = norm(x, r)
    got_act = act(x)
    assert calls == ["norm", "act"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_res, want_res)
    torch.testing.assert_close(got_act, want_act, atol=1e-6, rtol=1e-6)
    # A strided view (per-head q/k norm on a slice) falls back to torch, same result.
    wide = rand((7, 192), torch.float32, seed=6)[:, :96]
    calls.clear()
    torch.testing.assert_close(norm(wide), RMSNorm._norm(norm, wide))
    assert calls == []


@pytest.mark.parametrize("call, message", [
    (lambda: fk.fused_rms_norm(torch.zeros(3, 8), torch.ones(8), 1e-6,
                               torch.zeros(3, 9)), "residual"),
    (lambda: fk.fused_rms_norm(torch.zeros(3, 8), torch.ones(7), 1e-6), "weight must be"),
    (lambda: fk.fused_rms_norm(torch.zeros(3, 8, dtype=torch.float64), torch.ones(8), 1e-6),
     "dtype torch.float64"),
    (lambda: fk.fused_rms_norm(torch.zeros(8, 3).t(), torch.ones(8), 1e-6), "contiguous"),
    (lambda: fk.fused_rms_norm(torch.zeros(3, 8), torch.ones(8), 1e-6,
                               torch.zeros(3, 8, dtype=torch.float16)), "must match x"),
    (lambda: fk.fused_silu_and_mul(torch.zeros(3, 7)), "even last dim"),
    (lambda: fk.fused_silu_and_mul(torch.zeros(3, 0)), "non-empty last dim"),
    (lambda: fk.fused_silu_and_mul([1.0, 2.0]), "must be a torch.Tensor"),
    (lambda: fr.fused_rotary(torch.zeros(3, 2, 8), torch.zeros(3, 1, 8), torch.zeros(3, 1, 3),
                             torch.zeros(3, 1, 3)), "does not match cos"),
    (lambda: fr.fused_rotary(torch.zeros(3, 16), torch.zeros(3, 1, 8), torch.zeros(3, 1, 4),
                             torch.zeros(3, 1, 4)), "query must be"),
    (lambda: fr.fused_rotary(torch.zeros(3, 2, 8), torch.zeros(3, 1, 8), torch.zeros(3, 4),
                             torch.zeros(3, 4)), "cos and sin"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_engine_flag_is_ignored_on_cpu(llama_setup, caplog):
    from tests.runtime.tiny_models import new_engine

    with caplog.at_level(logging.INFO, logger="llmbatch.runtime.kernel_paths"):
        engine = new_engine(llama_setup, fused_kernels=True, kv_cache_blocks=16)
    runner = engine.runner
    assert runner.fused_kernels_active is False
    assert "fused_kernels ignored on cpu" in caplog.text
    flagged = [m for m in runner.model.modules() if getattr(m, "use_fused_kernel", False)]
    assert flagged == []


def test_job_spec_maps_fused_kernels():
    from llmbatch.jobs.loader import load_job

    base = {"model": {"path": "m"}, "input": {"path": "in.parquet"},
            "output": {"path": "out"}}
    assert load_job(base).engine_config().fused_kernels is True   # the default since the H200 run
    off = load_job({**base, "engine": {"fused_kernels": False}})
    assert off.engine_config().fused_kernels is False
    # A performance knob: the output-identity hash does not change.
    assert off.config_hash(1) == load_job(base).config_hash(1)


@pytest.mark.parametrize("variant,flag,why", [
    ("unfused", "--unfused", "fused kernels run on CUDA only"),
    ("skinny", "--skinny", "skinny matmul runs on CUDA only")])
def test_bench_cuda_only_variants_and_cpu_rows_say_skipped(tmp_path, variant, flag, why):
    from bench import run as bench_run

    assert getattr(bench_run.parse_args([]), variant) is False
    args = bench_run.parse_args([flag])
    assert getattr(args, variant) is True
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    workloads = {"W-RANDOM": object(), "W-PREFIX": object(), "W-BATCH1": object()}
    bench_run.run_llmbatch(args, rec, workloads, "unused", "float32", "cpu", 100, variant=variant)
    skipped = {f"llmbatch-{variant}": {"skipped": why}}
    assert rec.results["runs"] == {"W-RANDOM": skipped, "W-PREFIX": skipped, "W-BATCH1": skipped}


def test_whole_model_forward_with_every_fused_kernel_equals_the_torch_path():
    """Norms, SiLU·mul and rotary switched on inside a real (tiny, random) Llama forward."""
    import transformers as tf

    from llmbatch.runtime.attention.backend import AttentionMetadata
    from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend
    from llmbatch.runtime.models.llama import LlamaAttention
    from llmbatch.runtime.models.registry import build_model

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg, torch.float32, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    # One span of 5 tokens (block 0 and 1 of size 4).
    ids = torch.tensor([3, 9, 27, 81, 115])
    pos = torch.arange(5)
    meta = AttentionMetadata(slot_mapping=pos.clone(),
                             query_start_loc=torch.tensor([0, 5], dtype=torch.int32),
                             seq_lens=torch.tensor([5], dtype=torch.int32),
                             block_tables=torch.tensor([[0, 1]], dtype=torch.int32),
                             max_query_len=5, max_seq_len=5)

    def forward(backend=None):
        caches = [(torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)) for _ in range(2)]
        with torch.no_grad():
            return model(ids, pos, caches, meta, backend or TorchAttentionBackend())

    want = forward()
    flagged = 0
    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul)):
            module.use_fused_kernel = True
            flagged += 1
        elif isinstance(module, LlamaAttention):
            module.use_fused_rotary = True
            flagged += 1
    assert flagged == 2 * 4 + 1      # per layer: 2 norms, the MLP activation, attention; final norm
    torch.testing.assert_close(forward(), want, atol=1e-5, rtol=1e-5)
    # With the triton backend, rotary also stores K/V into the cache (fused_rotary_store_kv).
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    torch.testing.assert_close(forward(TritonAttentionBackend()), want, atol=1e-5, rtol=1e-5)
