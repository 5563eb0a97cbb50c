"""The decode / verify attention with rotary + K/V store fused in (triton_kernels/
rotary_decode.py, TritonAttentionBackend.forward_rotary_decode), on CPU under the Triton
interpreter: one-token spans and spans of 2..8 tokens.

Its contract: the same output and the same caches as the two launches it replaces,
fused_rotary_store_kv then forward -- bit for bit here, where the interpreter rounds both
alike (tests/gpu/test_rotary_decode_attention_gpu.py compares them on a GPU within float
tolerance). The two-launch path is itself checked against torch elsewhere
(test_fused_kernels.py, test_triton_attention.py); one case here also goes to torch directly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.runtime.test_triton_attention import (  # noqa: E402  (sets TRITON_INTERPRET first)
    _INTERPRETED, TorchAttentionBackend, make_case)

needs_interpreter = pytest.mark.skipif(
    not _INTERPRETED, reason="runs under TRITON_INTERPRET=1 on CPU; tests/gpu covers CUDA")


def rotary_inputs(case, num_heads: int, dtype, seed: int = 3, table: bool = False):
    """(q, k, v, cos, sin): q, k, v as strided views of one fused qkv row per token (as the
    model splits qkv_proj's output), not rotated; cos/sin (num_tokens, 1, head_dim/2) in
    dtype, contiguous or (table) views of one (num_tokens, 2, head_dim/2) gather."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_kv_heads, head_dim = case.key.shape
    device = case.query.device
    qkv = torch.empty(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                      device=device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv[:, :q_size] = case.query.reshape(num_tokens, -1)
    qkv[:, q_size:q_size + kv_size] = case.key.reshape(num_tokens, -1)
    qkv[:, q_size + kv_size:] = case.value.reshape(num_tokens, -1)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    angles = (torch.rand(num_tokens, 1, head_dim // 2, generator=gen) * 40.0).to(device)
    if table:
        cs = torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype)   # (T, 2, D/2)
        cos, sin = cs[:, 0:1], cs[:, 1:2]
    else:
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim), cos, sin)


def run_two_ways(case, backend, q, k, v, cos, sin):
    """((out, k_cache, v_cache) of the fused launch, the same of the two launches)."""
    from llmbatch.runtime.layers.fused_rotary import fused_rotary_store_kv

    kc1, vc1 = case.k_cache.clone(), case.v_cache.clone()
    out1 = backend.forward_rotary_decode(q, k, v, cos, sin, kc1, vc1, case.meta, case.scale)
    kc2, vc2 = case.k_cache.clone(), case.v_cache.clone()
    q_rot = fused_rotary_store_kv(q, k, v, cos, sin, kc2, vc2, case.meta.slot_mapping)
    out2 = backend.forward(q_rot, kc2, vc2, case.meta, case.scale)
    return (out1, kc1, vc1), (out2, kc2, vc2)


def assert_bitwise(got, want):
    for a, b in zip(got, want):
        # NaN == NaN for the untouched (poisoned) cache slots; every other element exactly.
        assert torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5))


# (name, spans (num_cached, query_len), num_heads, num_kv_heads, head_dim, block_size,
#  backend kwargs)
CASES = [
    ("gqa4", [(0, 1), (15, 1), (16, 1), (47, 1), (5, 1)], 8, 2, 64, 16, {}),
    ("mha_hd32", [(3, 1), (31, 1), (64, 1)], 4, 4, 32, 16, {}),
    ("gqa8_block32", [(31, 1), (63, 1), (100, 1)], 16, 2, 64, 32, {}),
    ("hd128_block64", [(0, 1), (127, 1), (128, 1)], 8, 2, 128, 64, {}),
    ("empty_spans", [(10, 0), (3, 1), (0, 0), (8, 1)], 4, 1, 32, 16, {}),
    ("gqa3_tile16", [(50, 1), (100, 1), (0, 1)], 6, 2, 32, 64, {"tile_n": 16}),
    # Split-KV: the new key's split must store it; splits past a short sequence hold no keys.
    # 300 cached + 1 = 301 keys = 19 tiles of 16 over 4 splits -> 8 a split: the key is in
    # split 2 (tiles 16..18), split 3 is empty; 17 -> 2 tiles, 1 a split: split 1 stores it.
    ("split4", [(300, 1), (17, 1), (0, 1), (129, 1)], 8, 2, 64, 16,
     {"num_kv_splits": 4, "tile_n": 16}),
    ("split16", [(1000, 1), (64, 1)], 8, 2, 64, 16, {"num_kv_splits": 16, "tile_n": 64}),
    ("tile128", [(300, 1), (17, 1), (129, 1), (0, 1)], 8, 2, 64, 16, {"tile_n": 128}),
]
# Spans of 2..8 tokens (speculative verify: k + 1 = 5 a sequence; ragged; prefill chunks that
# short): each span is one query tile, whose programs store the span's keys in their splits.
# Offsets of the spans in the step are not multiples of BLOCK_Q (8 here), so spans also get
# spare tiles; keys cross 16-key pages (14 + 5, 29 + 4, 62 + 8).
CASES += [
    ("verify5_b1", [(40, 5)], 8, 2, 64, 16, {}),
    ("verify5_b3", [(0, 5), (27, 5), (60, 5)], 8, 2, 64, 16, {}),
    ("ragged1to8_mha", [(3, 1), (10, 2), (0, 3), (14, 4), (33, 5), (7, 6), (50, 7), (9, 8)],
     4, 4, 64, 16, {}),
    ("span_cross_block_gqa8_hd128", [(14, 5), (29, 4), (62, 8)], 16, 2, 128, 16, {}),
    ("span_hd128_block64", [(60, 5), (0, 8), (127, 2)], 8, 2, 128, 64, {}),
    ("span_empty", [(10, 0), (12, 5), (0, 0), (5, 3), (7, 0)], 4, 1, 32, 16, {}),
    # Split-KV, 16-key tiles over 4 splits: 30 + 5 = 35 keys = 3 tiles, one a split: keys 30,
    # 31 are split 1's, 32..34 split 2's; 126 + 5 -> 9 tiles, 4 a split: 126, 127 split 1,
    # 128..130 split 2; 300 + 5 -> 20 tiles, 8 a split: all split 2's; 0 + 5: split 0 only.
    ("split4_span", [(300, 5), (30, 5), (0, 5), (126, 5), (15, 2)], 8, 2, 64, 16,
     {"num_kv_splits": 4, "tile_n": 16}),
]
CASES += [(name + "_fused", spans, heads, kv_heads, head_dim, block_size,
           dict(kwargs, fused_split_reduce=True))
          for name, spans, heads, kv_heads, head_dim, block_size, kwargs in CASES
          if kwargs.get("num_kv_splits", 1) > 1]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,spans,heads,kv_heads,head_dim,block_size,kwargs", CASES,
                         ids=[c[0] for c in CASES])
def test_equals_rotary_store_then_attention(poisoned_empty, name, spans, heads, kv_heads,
                                            head_dim, block_size, kwargs, dtype):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    case = make_case(spans, heads, kv_heads, head_dim, block_size, dtype)
    q, k, v, cos, sin = rotary_inputs(case, heads, dtype, table=name.startswith("split"))
    fused, two = run_two_ways(case, TritonAttentionBackend(**kwargs), q, k, v, cos, sin)
    assert not torch.isnan(fused[0]).any(), "an output element was left unwritten"
    assert_bitwise(fused, two)
    # The new tokens' slots were NaN before (make_case): now they hold the rotated key.
    written = case.meta.slot_mapping
    assert not torch.isnan(fused[1].view(-1, kv_heads, head_dim)[written]).any()


@needs_interpreter
def test_matches_torch_rotate_write_attend():
    """One case straight against torch: RotaryEmbedding.rotate, the torch backend's write_kv
    and forward in float32."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.layers.rotary import RotaryEmbedding

    heads = 8
    case = make_case([(40, 1), (0, 1), (77, 1)], heads, 2, 64, 16, torch.float32)
    q, k, v, cos, sin = rotary_inputs(case, heads, torch.float32)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    got = TritonAttentionBackend(num_kv_splits=2, tile_n=16).forward_rotary_decode(
        q, k, v, cos, sin, kc, vc, case.meta, case.scale)
    oracle = TorchAttentionBackend()
    rk, rv = case.k_cache.clone(), case.v_cache.clone()
    k_rot = RotaryEmbedding.rotate(k, cos, sin)
    oracle.write_kv(k_rot, v, rk, rv, case.meta.slot_mapping)
    want = oracle.forward(RotaryEmbedding.rotate(q, cos, sin), rk, rv, case.meta, case.scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    slots = case.meta.slot_mapping
    torch.testing.assert_close(kc.view(-1, 2, 64)[slots], k_rot, atol=0, rtol=0)
    torch.testing.assert_close(vc.view(-1, 2, 64)[slots], v, atol=0, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("spans,padded", [
    ([(20, 1), (9, 1)], [1]),
    # A span's middle token (a later one reads the stale slot, as on the two launches), its
    # first key of split 1 (12 + 5 = 17 keys, 16-key tiles: position 16) and a last token.
    ([(12, 5), (9, 3)], [1, 4, 7]),
], ids=["decode", "spans"])
def test_negative_slot_stores_nothing(spans, padded):
    """A padded row (slot -1, as CUDA-graph padding makes) writes no cache slot; its output is
    whatever the cache held, as on the two-launch path."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    heads, kv_heads, head_dim = 4, 2, 32
    case = make_case(spans, heads, kv_heads, head_dim, 16, torch.float32)
    q, k, v, cos, sin = rotary_inputs(case, heads, torch.float32)
    # Fill the rows' own slots first (a finite stale value), then mark them padding.
    flat_k = case.k_cache.view(-1, kv_heads, head_dim)
    flat_v = case.v_cache.view(-1, kv_heads, head_dim)
    padded_slots = case.meta.slot_mapping[padded].clone()
    flat_k[padded_slots] = 0.5
    flat_v[padded_slots] = -0.25
    case.meta.slot_mapping[padded] = -1
    fused, two = run_two_ways(case, TritonAttentionBackend(num_kv_splits=2, tile_n=16),
                              q, k, v, cos, sin)
    assert_bitwise(fused, two)
    assert torch.equal(fused[1].view(-1, kv_heads, head_dim)[padded_slots],
                       torch.full((len(padded), kv_heads, head_dim), 0.5))
    assert not torch.isnan(fused[0]).any()


@needs_interpreter
def test_refuses_longer_spans_and_bad_inputs():
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    case = make_case([(5, 9)], 4, 2, 32, 16, torch.float32)
    q, k, v, cos, sin = rotary_inputs(case, 4, torch.float32)
    with pytest.raises(ValueError, match="at most 8 tokens.*got max_query_len=9"):
        backend.forward_rotary_decode(q, k, v, cos, sin, case.k_cache, case.v_cache,
                                      case.meta, case.scale)
    assert not backend.rotary_in_attention_fits(case.meta, 4, 2)
    # 16-row tiles at group 4: 4 tokens a tile, so a 5-token span would span two tiles.
    narrow = TritonAttentionBackend(max_block_m=16)
    case = make_case([(5, 5)], 4, 1, 32, 16, torch.float32)
    q, k, v, cos, sin = rotary_inputs(case, 4, torch.float32)
    with pytest.raises(ValueError, match="at most 4 tokens.*got max_query_len=5"):
        narrow.forward_rotary_decode(q, k, v, cos, sin, case.k_cache, case.v_cache,
                                     case.meta, case.scale)
    narrow.rotary_in_attention = backend.rotary_in_attention = True
    assert not narrow.rotary_in_attention_fits(case.meta, 4, 1)
    assert backend.rotary_in_attention_fits(case.meta, 4, 1)
    case.meta.max_query_len = 4
    assert narrow.rotary_in_attention_fits(case.meta, 4, 1)
    backend.rotary_in_attention = False
    assert not backend.rotary_in_attention_fits(case.meta, 4, 1)
    case = make_case([(5, 1)], 4, 2, 32, 16, torch.float32)
    q, k, v, cos, sin = rotary_inputs(case, 4, torch.float32)
    with pytest.raises(ValueError, match="value must match key"):
        backend.forward_rotary_decode(q, k, v[..., :16], cos, sin, case.k_cache, case.v_cache,
                                      case.meta, case.scale)
    with pytest.raises(ValueError, match="slot_mapping must be an integer"):
        case.meta.slot_mapping = case.meta.slot_mapping.float()
        backend.forward_rotary_decode(q, k, v, cos, sin, case.k_cache, case.v_cache,
                                      case.meta, case.scale)



def _engine_tokens(tmp_path, monkeypatch, arch, model_kwargs, prompts, max_new_tokens,
                   **engine_kwargs):
    """({backend: greedy tokens per prompt} for the torch and triton backends, the
    max_query_len of every forward_rotary_decode call). kernel_paths sets the fused rotary
    on CUDA only, so the triton engine gets it by hand, as ModelRunner would find it on a
    GPU."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.models.llama import LlamaAttention
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import make_model, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_model(tmp_path, arch=arch, **model_kwargs)
    calls = []
    real = TritonAttentionBackend.forward_rotary_decode

    def counted(self, *args, **kw):
        calls.append(args[-2].max_query_len)   # meta
        return real(self, *args, **kw)

    monkeypatch.setattr(TritonAttentionBackend, "forward_rotary_decode", counted)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32",
                              attention_backend=backend, rotary_in_attention=True,
                              **engine_kwargs)
        engine = Engine(config, tokenizer=tokenizer)
        # On the CPU ModelRunner ignored the option (no fused rotary there): switch it on.
        assert engine.stats()["rotary_in_attention"] is False
        if backend == "triton":
            for m in engine.runner.model.modules():
                if isinstance(m, LlamaAttention):
                    m.use_fused_rotary = True
            engine.runner.attn_backend.rotary_in_attention = True
        requests = [Request(i, p, SamplingParams(max_new_tokens=max_new_tokens))
                    for i, p in enumerate(prompts)]
        results = {r.request_id: r.output_token_ids for r in engine.generate(requests)}
        outputs[backend] = [results[i] for i in range(len(prompts))]
    assert all(len(o) == max_new_tokens for o in outputs["torch"])
    return outputs, calls


@needs_interpreter
@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(num_heads=8, num_kv_heads=2, head_dim=16)),
    ("qwen3", dict(num_heads=4, num_kv_heads=1, head_dim=32, tie=True)),   # q/k norms
])
def test_engine_greedy_equal_with_rotary_in_attention(tmp_path, monkeypatch, arch, kwargs):
    """Through the model: the decode steps of a triton-backend engine take the one-launch
    path (counted), prefill and chunked steps the two launches, and the greedy tokens equal
    the torch backend's."""
    from tests.runtime.tiny_models import make_prompts

    outputs, calls = _engine_tokens(tmp_path, monkeypatch, arch, kwargs, make_prompts(4), 6,
                                    max_num_batched_tokens=64)
    assert outputs["triton"] == outputs["torch"]
    # Decode steps only, every layer of each (no prefill step here is <= 8 tokens).
    assert calls and set(calls) == {1}


@needs_interpreter
def test_engine_ngram_verify_steps_take_the_one_launch_path(tmp_path, monkeypatch):
    """n-gram speculation at batch 1 (W-SPEC's shape, k = 4): the verify steps (spans of up to
    5 tokens) take the one-launch path too, and the greedy tokens equal the torch backend's.
    The prompt repeats a pattern, so the n-gram proposer has drafts from the first step."""
    prompt = [7, 11, 13, 17, 19, 23, 29, 31] * 3
    outputs, calls = _engine_tokens(
        tmp_path, monkeypatch, "llama", dict(num_heads=8, num_kv_heads=2, head_dim=16),
        [prompt], 10, max_num_seqs=1, speculative_method="ngram", num_speculative_tokens=4)
    assert outputs["triton"] == outputs["torch"]
    assert any(n > 1 for n in calls), f"no verify step took the path: {sorted(set(calls))}"
    assert max(calls) <= 5
