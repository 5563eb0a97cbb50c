"""Triton attention kernels vs the torch oracle, on CPU under the Triton interpreter.

The interpreter must be switched on before triton decorates our kernels, hence the environment
set-up above the imports. On a machine with CUDA this module defers to tests/gpu (which imports
the case builders below and runs the same cases compiled, bf16 included).
"""

from __future__ import annotations

import os
import sys

import torch

_KERNELS = "llmbatch.runtime.attention.triton_kernels.paged_attention"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernels are decorated (interpreted or compiled) when their module is first imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and _KERNELS not in sys.modules

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from llmbatch.runtime.attention.backend import AttentionMetadata  # noqa: E402
from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend  # noqa: E402


@dataclass
class Case:
    query: torch.Tensor      # (num_tokens, num_heads, head_dim)
    key: torch.Tensor        # (num_tokens, num_kv_heads, head_dim): this step's new K
    value: torch.Tensor
    k_cache: torch.Tensor    # (num_blocks, block_size, num_kv_heads, head_dim), prefix filled
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_case(spans, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cpu",
              seed=0, extra_pages=1) -> Case:
    """A step over `spans`, a list of (num_cached_tokens, query_len) per sequence.

    Pages are scattered randomly over the pool; every slot that holds no token of any sequence
    (tails of last pages, `extra_pages` allocated-but-empty pages per sequence, spare blocks)
    is NaN, so a kernel that reads past a sequence's end poisons its output. The cached prefix
    is in the cache already; the new tokens' K/V are returned for the caller to write.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in spans]
    pages_per_seq = [math.ceil(n / block_size) + extra_pages for n in seq_lens]
    num_blocks = sum(pages_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_pages = max(pages_per_seq) + 1  # one column of padding (0) beyond every table
    block_tables = torch.zeros(len(spans), max_pages, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    slots, starts, keys, values = [], [0], [], []
    for i, ((cached, qlen), n) in enumerate(zip(spans, seq_lens)):
        pages = [perm.pop() for _ in range(pages_per_seq[i])]
        block_tables[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        seq_slots = [pages[p // block_size] * block_size + p % block_size for p in range(n)]
        k_seq = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v_seq = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        prefix = torch.tensor(seq_slots[:cached], dtype=torch.long)
        k_flat[prefix] = k_seq[:cached]
        v_flat[prefix] = v_seq[:cached]
        slots += seq_slots[cached:]
        keys.append(k_seq[cached:])
        values.append(v_seq[cached:])
        starts.append(starts[-1] + qlen)
    num_tokens = starts[-1]
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(q for _, q in spans),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )

    def cast(t):
        return t.to(device=device, dtype=dtype)

    return Case(cast(query), cast(torch.cat(keys)), cast(torch.cat(values)), cast(k_cache),
                cast(v_cache), meta, 1.0 / math.sqrt(head_dim))


def run_both(case: Case, backend):
    """(triton output, float32 oracle output); the triton output buffer starts as NaN."""
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    backend.write_kv(case.key, case.value, k_cache, v_cache, case.meta.slot_mapping)
    out = torch.full_like(case.query, float("nan"))
    got = backend.forward(case.query, k_cache, v_cache, case.meta, case.scale, out=out)
    assert got is out
    # Oracle in float32 on the same (possibly rounded) inputs.
    oracle = TorchAttentionBackend()
    rk, rv = case.k_cache.float().clone(), case.v_cache.float().clone()
    oracle.write_kv(case.key.float(), case.value.float(), rk, rv, case.meta.slot_mapping)
    want = oracle.forward(case.query.float(), rk, rv, case.meta, case.scale)
    return got, want


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(got, want, dtype):
    assert not torch.isnan(got).any(), "an output element was left unwritten (still NaN)"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


# (name, spans, num_heads, num_kv_heads, head_dim, block_size, backend kwargs)
CASES = [
    # decode-only batch: fresh sequence, last slot of a page, first slot of a new page.
    ("decode_gqa4", [(0, 1), (15, 1), (16, 1), (47, 1), (5, 1)], 8, 2, 64, 16, {}),
    # prefill chunks after prefix-cache hits mixed with decodes, MHA (ratio 1).
    ("mixed_mha", [(0, 37), (32, 20), (5, 1), (70, 1), (16, 16)], 4, 4, 32, 16, {}),
    # GQA 8, block 32: spans crossing page boundaries, a full first page, speculative k+1.
    ("mixed_gqa8", [(31, 2), (0, 64), (63, 1), (100, 9), (27, 5)], 16, 2, 64, 32, {}),
    # block 64, head_dim 128: full pages exactly, and one token into a fresh page.
    ("full_blocks_hd128", [(0, 1), (64, 64), (127, 1), (128, 1)], 8, 2, 128, 64, {}),
    # empty spans (query_len 0) between real ones, as padded batches produce.
    ("empty_spans", [(10, 0), (3, 4), (0, 0), (8, 1)], 4, 1, 32, 16, {}),
    # a key tile smaller than a page, and a group that is not a power of two (3).
    ("tile_lt_page_gqa3", [(50, 13), (100, 1), (0, 20)], 6, 2, 32, 64, {"tile_n": 16}),
    # split-KV forced: decodes over long-ish contexts, some splits with no keys at all.
    ("split_decode", [(300, 1), (17, 1), (0, 1), (129, 1)], 8, 2, 64, 16,
     {"num_kv_splits": 4, "tile_n": 16}),
    # 128-key tiles (the default for wide decode batches): pages of 16 inside one tile.
    ("decode_tile128", [(300, 1), (17, 1), (129, 1), (0, 1)], 8, 2, 64, 16, {"tile_n": 128}),
    # split-KV on a mixed batch too (the kernel supports it for any span length).
    ("split_mixed", [(40, 30), (90, 1), (0, 9)], 8, 8, 32, 32, {"num_kv_splits": 3, "tile_n": 16}),
    # k+1 = 5 verify windows split like decode: tiles per split is a power of two from the
    # sequence length (98 keys = 7 tiles of 16 over 3 splits -> 4, 4, 0 of them; 205 -> 8 each;
    # 15 -> 1, splits 1 and 2 empty), beside a decode at 96 keys (6 tiles -> 2 per split).
    ("split_verify", [(93, 5), (200, 5), (10, 5), (95, 1)], 8, 2, 64, 16,
     {"num_kv_splits": 3, "tile_n": 16}),
]
# The split cases again with the splits merged inside the kernel (fused_split_reduce).
CASES += [(name + "_fused", spans, heads, kv_heads, head_dim, block_size,
           dict(kwargs, fused_split_reduce=True))
          for name, spans, heads, kv_heads, head_dim, block_size, kwargs in CASES
          if kwargs.get("num_kv_splits", 1) > 1]


def case_ids():
    return [c[0] for c in CASES]


needs_interpreter = pytest.mark.skipif(
    not _INTERPRETED, reason="runs under TRITON_INTERPRET=1 on CPU; tests/gpu covers CUDA")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,spans,heads,kv_heads,head_dim,block_size,kwargs", CASES,
                         ids=case_ids())
def test_forward_matches_torch(name, spans, heads, kv_heads, head_dim, block_size, kwargs, dtype):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    case = make_case(spans, heads, kv_heads, head_dim, block_size, dtype)
    got, want = run_both(case, TritonAttentionBackend(**kwargs))
    assert_close(got, want, dtype)


def store_kv_check(device, dtype, seed=0):
    """write_kv equals the oracle bit for bit, from a strided key view, skipping slot -1."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 6, 16, 3, 32, 20
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 7, 19]] = -1  # padding tokens: must not be written anywhere
    # K and V as views into a fused buffer, like a qkv projection's output.
    fused = torch.randn(num_tokens, 2 * kv_heads + 1, head_dim, generator=gen).to(device, dtype)
    key, value = fused[:, :kv_heads], fused[:, kv_heads:2 * kv_heads]
    cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    k_cache, v_cache = cache.to(device, dtype), cache.to(device, dtype, copy=True)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = slots.to(device)
    TritonAttentionBackend().write_kv(key, value, k_cache, v_cache, slots)
    TorchAttentionBackend().write_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(),
                                                                       v_ref.isnan())
    written = ~k_ref.isnan()
    assert int(written.sum()) == 17 * kv_heads * head_dim
    assert torch.equal(k_cache[written], k_ref[written])
    assert torch.equal(v_cache[~v_ref.isnan()], v_ref[~v_ref.isnan()])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_store_kv_matches_torch_and_skips_negative_slots(dtype):
    store_kv_check("cpu", dtype)


@needs_interpreter
def test_store_kv_casts_to_cache_dtype():
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    key = torch.randn(3, 2, 16)
    k_cache = torch.zeros(2, 4, 2, 16, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    TritonAttentionBackend().write_kv(key, key * 2, k_cache, v_cache, torch.tensor([0, 5, 6]))
    assert torch.equal(k_cache.view(-1, 2, 16)[[0, 5, 6]], key.half())
    assert torch.equal(v_cache.view(-1, 2, 16)[[0, 5, 6]], (key * 2).half())
    assert int(k_cache.count_nonzero()) == int(key.half().count_nonzero())


@needs_interpreter
def test_empty_batch_returns_empty_output():
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    case = make_case([(4, 1)], 2, 1, 16, 16, torch.float32)
    meta = AttentionMetadata(case.meta.slot_mapping[:0], torch.zeros(1, dtype=torch.int32),
                             torch.zeros(0, dtype=torch.int32),
                             torch.zeros(0, 2, dtype=torch.int32), 0, 0)
    out = TritonAttentionBackend().forward(case.query[:0], case.k_cache, case.v_cache, meta, 1.0)
    assert out.shape == (0, 2, 16)


def test_split_heuristic_and_tiling_choices():
    """Launch sizes are pure functions of Python ints (no device reads)."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    b = TritonAttentionBackend()
    assert b._query_tiling(1, 8) == (2, 16)      # decode, GQA 8: 8 real rows of 16
    assert b._query_tiling(1, 1) == (16, 16)
    assert b._query_tiling(5, 8) == (8, 64)      # k+1 = 5 speculative tokens
    assert b._query_tiling(500, 1) == (64, 64)
    assert b._query_tiling(500, 3) == (21, 64)
    meta = make_case([(600, 1)], 2, 1, 16, 16, torch.float32).meta
    assert b._num_splits(meta, 1, torch.device("cpu")) == 1  # never on CPU unless forced
    assert TritonAttentionBackend(num_kv_splits=4)._num_splits(meta, 1, torch.device("cpu")) == 4


def test_split_heuristic_on_a_132_sm_card(monkeypatch):
    """Split only decode-like batches too small to fill the card, by at most 16, >= 64 keys each."""
    from llmbatch.runtime.attention import triton_backend

    monkeypatch.setattr(triton_backend, "_num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)  # constructing a device object needs no GPU
    b = triton_backend.TritonAttentionBackend()

    def splits(num_seqs, max_query_len, max_seq_len, num_kv_heads=8):
        meta = AttentionMetadata(torch.zeros(1), torch.zeros(num_seqs + 1),
                                 torch.zeros(num_seqs), torch.zeros(num_seqs, 1),
                                 max_query_len, max_seq_len)
        return b._num_splits(meta, num_kv_heads, cuda)

    assert splits(1, 1, 1024) == 16          # batch 1: min(16, cdiv(264, 8)=33, 1024 // 64)
    assert splits(1, 1, 200) == 2            # 200 // 64 = 3 -> power of two below
    assert splits(1, 1, 100) == 1            # a single key tile: nothing to split
    assert splits(16, 1, 4096) == 2          # 128 programs: cdiv(264, 128) = 3 -> 2
    assert splits(17, 1, 4096) == 1          # 136 programs fill 132 SMs
    assert splits(1, 5, 4096) == 16          # k+1 = 5 speculative tokens: like decode
    assert splits(16, 5, 4096) == 2          # the largest speculating batch (16 sequences)
    # Verify-like spans: the count depends on the batch only (not on 200 // 64 = 3), as in a
    # graph captured at max_model_len, so a row's roundings do not move with the length.
    assert splits(1, 5, 200) == splits(1, 2, 64) == splits(1, 5, 131072) == 16
    assert splits(4, 8, 100) == splits(4, 8, 8192) == 8
    assert splits(1, 9, 4096) == 1           # a prefill chunk never splits


@needs_interpreter
@pytest.mark.parametrize("mutate,message", [
    (lambda c: {"k_cache": c.k_cache[..., :8], "v_cache": c.v_cache[..., :8]}, "head_dim"),
    (lambda c: {"query": c.query[:, :3]}, "multiple of num_kv_heads"),
    (lambda c: {"query": c.query.to(torch.int32)}, "dtype"),
    (lambda c: {"v_cache": c.v_cache[:1]}, "k_cache and v_cache"),
    (lambda c: {"out": torch.empty(1)}, "out must match"),
    (lambda c: {"query": c.query[:1]}, "query_start_loc must run from 0"),
])
def test_bad_inputs_raise_clear_errors(mutate, message):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    case = make_case([(4, 2)], 4, 2, 16, 16, torch.float32)
    args = {"query": case.query, "k_cache": case.k_cache, "v_cache": case.v_cache, "out": None}
    args.update(mutate(case))
    with pytest.raises(ValueError, match=message):
        TritonAttentionBackend().forward(args["query"], args["k_cache"], args["v_cache"],
                                         case.meta, case.scale, out=args["out"])


def test_backend_options_are_validated():
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    with pytest.raises(ValueError, match="num_kv_splits"):
        TritonAttentionBackend(num_kv_splits=0)
    with pytest.raises(ValueError, match="tile_n"):
        TritonAttentionBackend(tile_n=24)


@needs_interpreter
def test_engine_greedy_equal_with_triton_backend(tmp_path):
    """End to end through the seam: chunked prefill (64-token budget) mixed with decodes gives
    the same greedy tokens with the triton backend as with the torch oracle."""
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    make_model(tmp_path, num_heads=8, num_kv_heads=2, head_dim=16)
    prompts = make_prompts(4)
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32",
                              attention_backend=backend, max_num_batched_tokens=64)
        engine = Engine(config, tokenizer=tokenizer)
        requests = [Request(i, p, SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts)]
        results = {r.request_id: r.output_token_ids for r in engine.generate(requests)}
        outputs[backend] = [results[i] for i in range(len(prompts))]
    assert all(len(o) == 6 for o in outputs["torch"])
    assert outputs["triton"] == outputs["torch"]



def test_default_key_tile():
    from llmbatch.runtime.attention.triton_backend import _default_tile_n

    assert _default_tile_n(64, 1, 64) == 128      # wide decode batch: longer K/V runs
    assert _default_tile_n(64, 1, 63) == 64
    assert _default_tile_n(64, 5, 256) == 64      # verify spans and prefill keep 64
    assert _default_tile_n(128, 1, 256) == 64     # not measured at head_dim 128
    assert _default_tile_n(256, 1, 1) == 32
