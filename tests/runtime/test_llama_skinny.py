"""models/llama_skinny.py: the fused <= 16-token decoder path equals the unfused forward (tiny
float32 Llama / Qwen2 / Qwen3 under the Triton interpreter; close, not bitwise: the float32
summation orders of the norms and matmuls differ), falls back for 17+ tokens, and is enabled
only for dense, unsharded models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.models import llama_skinny  # noqa: E402
from tests.runtime.test_models import (load_ours, make_hf_model, make_kv_caches,  # noqa: E402
                                       random_block_tables, run_step)

# GQA + tied + llama3 rope; Qwen2's q/k/v bias; Qwen3's q/k norm with q/k/v/o bias.
CASES = ("llama-gqa-hd32-tied-llama3", "qwen2-gqa-hd32-tied", "qwen3-gqa-hd128-bias")
ATOL = 1e-4


@pytest.fixture(params=CASES)
def model(request, tmp_path):
    hf = make_hf_model(request.param, tmp_path)
    return load_ours(hf, tmp_path)


def both_paths(model, steps, count_calls=None):
    """Run `steps` (each a list of run_step spans) on fresh KV caches with the fused path off,
    then on; returns ([logits off], [logits on], kv off, kv on)."""
    results = []
    for on in (False, True):
        model.model.use_skinny_matmul = on
        kv = make_kv_caches(model)
        results.append(([run_step(model, kv, spans) for spans in steps], kv))
    model.model.use_skinny_matmul = False
    (off, kv_off), (on, kv_on) = results
    return off, on, kv_off, kv_on


def test_prefill_of_1_to_16_tokens_matches_unfused(model):
    tables = random_block_tables(3, 32, seed=1)
    prompt = [(7 * i + 3) % 300 for i in range(16)]
    steps = [[(prompt[:n], tables[0], 0, n)] for n in (1, 9, 16)]
    off, on, _, _ = both_paths(model, steps)
    for a, b in zip(off, on):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)


def test_decode_steps_after_a_long_prefill_match_unfused(model, monkeypatch):
    """A 20-token prefill (falls back: > 16 tokens), then decode steps of 3 sequences and a
    5-token verify-like span, which take the fused path; logits and the KV written agree."""
    calls = []
    real = llama_skinny.skinny_model_forward
    monkeypatch.setattr(llama_skinny, "skinny_model_forward",
                        lambda m, h, *a: calls.append(h.shape[0]) or real(m, h, *a))
    tables = random_block_tables(3, 32, seed=2)
    seqs = [[(5 * i + s) % 300 for i in range(28)] for s in range(3)]
    steps = [[(seqs[0], tables[0], 0, 20)],
             [(seqs[1], tables[1], 0, 12), (seqs[2], tables[2], 0, 4)],
             [(seqs[0], tables[0], 20, 21), (seqs[1], tables[1], 12, 13),
              (seqs[2], tables[2], 4, 5)],
             [(seqs[0], tables[0], 21, 26)]]
    off, on, kv_off, kv_on = both_paths(model, steps)
    assert calls == [16, 3, 5]  # the 20-token step ran the unfused loop
    for a, b in zip(off, on):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)
    for (k0, v0), (k1, v1) in zip(kv_off, kv_on):
        torch.testing.assert_close(k1, k0, atol=ATOL, rtol=ATOL, equal_nan=True)
        torch.testing.assert_close(v1, v0, atol=ATOL, rtol=ATOL, equal_nan=True)


def test_17_tokens_fall_back(model, monkeypatch):
    monkeypatch.setattr(llama_skinny, "skinny_model_forward",
                        lambda *a: pytest.fail("fused path taken for 17 tokens"))
    model.model.use_skinny_matmul = True
    table = random_block_tables(1, 32, seed=3)[0]
    run_step(model, make_kv_caches(model), [(list(range(17)), table, 0, 17)])
    model.model.use_skinny_matmul = False


def test_enable_only_for_dense_unsharded_models(model):
    assert llama_skinny.enable_skinny_matmul(model) is True
    assert model.model.use_skinny_matmul is True and model.model.skinny_pdl is False
    assert llama_skinny.enable_skinny_matmul(model, pdl=True) is True
    assert model.model.skinny_pdl is True
    model.model.layers[1].mlp.down_proj.quant_method = object()  # e.g. an int8 layer
    assert llama_skinny.enable_skinny_matmul(model, pdl=True) is False
    assert model.model.use_skinny_matmul is False and model.model.skinny_pdl is False


def test_pdl_flag_reaches_every_skinny_launch(model, monkeypatch):
    """EngineConfig.pdl's module flag is passed to all 4 launches of every layer (the launch
    itself needs CUDA sm_90+: here the recorded calls run without it)."""
    seen = []
    real = llama_skinny.sm.skinny_linear

    def recording(*args, pdl=False, **kwargs):
        seen.append(pdl)
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_skinny.sm, "skinny_linear", recording)
    table = random_block_tables(1, 32, seed=4)[0]
    for pdl in (False, True):
        model.model.use_skinny_matmul, model.model.skinny_pdl = True, pdl
        run_step(model, make_kv_caches(model), [(list(range(3)), table, 0, 3)])
    model.model.use_skinny_matmul = model.model.skinny_pdl = False
    per_step = 4 * len(model.model.layers)
    assert seen == [False] * per_step + [True] * per_step


def test_skinny_applies_only_to_matching_small_steps(model):
    hidden = torch.zeros(16, model.config.hidden_size)
    assert llama_skinny.skinny_applies(model.model, hidden)
    assert not llama_skinny.skinny_applies(model.model, torch.zeros(17, hidden.shape[1]))
    assert not llama_skinny.skinny_applies(model.model, torch.zeros(0, hidden.shape[1]))
    assert not llama_skinny.skinny_applies(model.model, hidden.half())  # weights are float32


def test_gemv_only_path_takes_one_token_steps_alone(model):
    """skinny_gemv without skinny_matmul (the CUDA default): skinny_max_tokens 1, so a
    one-token step takes the path and a 2-token step stays unfused."""
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, small_steps=False)
    width = model.config.hidden_size
    assert llama_skinny.skinny_applies(model.model, torch.zeros(1, width))
    assert not llama_skinny.skinny_applies(model.model, torch.zeros(2, width))
    llama_skinny.disable_skinny_matmul(model)
    assert model.model.skinny_max_tokens == 16


def test_with_fused_kernels_and_triton_attention_matches_torch_path(tmp_path):
    """The GPU configuration (fused norms, rotary + K/V store kernel, triton attention) with
    the skinny path on, against the plain torch path: 2 decode-like sequences of 4 + 3 tokens."""
    from llmbatch.runtime.attention.backend import AttentionMetadata
    from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.layers.activation import SiluAndMul
    from llmbatch.runtime.layers.norm import RMSNorm
    from llmbatch.runtime.models.llama import LlamaAttention

    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    ids = torch.tensor([3, 9, 27, 81, 115, 7, 200])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    meta = AttentionMetadata(slot_mapping=torch.tensor([16, 17, 18, 19, 32, 33, 34]),
                             query_start_loc=torch.tensor([0, 4, 7], dtype=torch.int32),
                             seq_lens=torch.tensor([4, 3], dtype=torch.int32),
                             block_tables=torch.tensor([[1], [2]], dtype=torch.int32),
                             max_query_len=4, max_seq_len=4)

    def forward(backend):
        with torch.no_grad():
            return model(ids, pos, make_kv_caches(model), meta, backend)

    want = forward(TorchAttentionBackend())
    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul)):
            module.use_fused_kernel = True
        elif isinstance(module, LlamaAttention):
            module.use_fused_rotary = True
    assert llama_skinny.enable_skinny_matmul(model)
    torch.testing.assert_close(forward(TritonAttentionBackend()), want, atol=ATOL, rtol=ATOL)


def test_engine_flag_is_ignored_on_cpu(llama_setup):
    from tests.runtime.tiny_models import new_engine

    engine = new_engine(llama_setup, skinny_matmul=True, pdl=True, kv_cache_blocks=16)
    assert engine.runner.model.model.use_skinny_matmul is False
    assert getattr(engine.runner.model.model, "skinny_pdl", False) is False


def greedy_unfused_then_forced(llama_setup, monkeypatch, force, num_prompts, max_new,
                               **engine_kwargs):
    """Greedy tokens of `num_prompts` prompts on the CPU engine as built (unfused), then with
    force(engine) switching the skinny path on; also the token count of every step that took
    the path (skinny_model_forward calls)."""
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import generate, make_prompts, new_engine

    calls = []
    real = llama_skinny.skinny_model_forward
    monkeypatch.setattr(llama_skinny, "skinny_model_forward",
                        lambda m, h, *a: calls.append(h.shape[0]) or real(m, h, *a))
    prompts = make_prompts(num_prompts, seed=7)
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    outputs = []
    for forced in (False, True):
        engine = new_engine(llama_setup, kv_cache_blocks=64, **engine_kwargs)
        if forced:
            force(engine)
        done = generate(engine, [Request(i, p, params) for i, p in enumerate(prompts)])
        outputs.append([done[i].output_token_ids for i in range(len(prompts))])
    return outputs, calls


def test_engine_greedy_tokens_equal_with_the_path_forced_on(llama_setup, monkeypatch):
    """End to end through the engine (prefill falls back, decode steps of <= 4 tokens fuse):
    the same greedy tokens as the unfused engine."""
    def force(engine):
        engine.runner.model.model.use_skinny_matmul = True

    (unfused, fused), calls = greedy_unfused_then_forced(llama_setup, monkeypatch, force, 4, 6,
                                                         max_num_seqs=4)
    assert fused == unfused
    assert all(len(o) == 6 for o in fused)
    assert len(calls) >= 5 and max(calls) <= 4  # the decode steps, fused


def test_engine_greedy_tokens_equal_on_the_gemv_only_path(llama_setup, monkeypatch):
    """The CUDA default (skinny_gemv auto, no skinny_matmul) forced on a CPU engine: batch-1
    decode steps run on layers/gemv.py, prefill steps stay unfused, and the greedy tokens are
    the unfused engine's."""
    def force(engine):
        assert llama_skinny.enable_skinny_matmul(engine.runner.model, gemv_rows=True,
                                                 small_steps=False)

    (unfused, gemv_only), calls = greedy_unfused_then_forced(llama_setup, monkeypatch, force,
                                                             2, 5, max_num_seqs=1)
    assert gemv_only == unfused
    assert all(len(o) == 5 for o in gemv_only)
    assert calls == [1] * 8   # 4 decode steps a prompt, one token each; prefills unfused


def record_gemv_rows(monkeypatch) -> list:
    """The row count of every gemv_linear call from here on (the calls still run)."""
    rows = []
    real = llama_skinny.gemv.gemv_linear
    monkeypatch.setattr(llama_skinny.gemv, "gemv_linear",
                        lambda x, *a, **kw: rows.append(x.shape[0]) or real(x, *a, **kw))
    return rows


def three_sequences():
    """(block tables, token ids) of three 24-token sequences for run_step spans."""
    return (random_block_tables(3, 32, seed=5),
            [[(3 * i + s) % 300 for i in range(24)] for s in range(3)])


def test_gemv_rows_run_one_token_steps_and_match_unfused(model, monkeypatch):
    """EngineConfig.skinny_gemv: a one-token decode step runs every layer's 4 matmuls on
    layers/gemv.py (a 3-sequence step stays on skinny_linear); logits match the unfused path
    and the shared arrival counters are all zero afterwards."""
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True) is True
    counters = model.model.skinny_gemv_counters
    assert counters.dtype == torch.int32 and int(counters.abs().sum()) == 0
    gemv_calls = record_gemv_rows(monkeypatch)
    tables, seqs = three_sequences()
    steps = [[(seqs[0], tables[0], 0, 20)],
             [(seqs[1], tables[1], 0, 6), (seqs[2], tables[2], 0, 4)],
             [(seqs[0], tables[0], 20, 21)],
             [(seqs[0], tables[0], 21, 22), (seqs[1], tables[1], 6, 7),
              (seqs[2], tables[2], 4, 5)],
             [(seqs[0], tables[0], 22, 23)]]
    off, on, _, _ = both_paths(model, steps)
    # The two 1-token steps' 4 matmuls a layer, and their LM head calls (lm_head.use_gemv is
    # set with the gemv layers, so in both passes: both_paths flips only the layers).
    assert gemv_calls == [1] * (2 * 4 * len(model.model.layers) + 2 * 2)
    for a, b in zip(off, on):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)
    assert int(counters.abs().sum()) == 0
    assert llama_skinny.enable_skinny_matmul(model) is True
    assert model.model.skinny_gemv_counters is None
    llama_skinny.enable_skinny_matmul(model, pdl=True, gemv_rows=True)
    llama_skinny.disable_skinny_matmul(model)     # bench_batch1's undo
    assert (model.model.use_skinny_matmul, model.model.skinny_pdl,
            model.model.skinny_gemv_counters) == (False, False, None)
