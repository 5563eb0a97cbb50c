"""Layers one by one: numerics against transformers' building blocks, and tensor-parallel
slicing simulated in one process (each rank's layer built and loaded separately, the
collective replaced by an explicit sum / concatenation of the ranks' outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from llmbatch.runtime.layers.activation import SiluAndMul
from llmbatch.runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmbatch.runtime.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                            QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
from llmbatch.runtime.layers.norm import RMSNorm
from llmbatch.runtime.layers.rotary import RotaryEmbedding, rope_params_from_config
from llmbatch.runtime.layers.weight_utils import LazyTensor

identity = lambda x: x  # noqa: E731  (all-reduce stand-in: the test sums the ranks itself)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def load(layer, param, tensor, shard_id=None):
    param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_column_and_row_parallel_reassemble_the_full_linear(tp_size):
    w1, b1, w2, b2 = randn(8, 6), randn(8), randn(6, 8), randn(6)
    x = randn(5, 6)
    outs = []
    for rank in range(tp_size):
        col = ColumnParallelLinear(6, 8, bias=True, tp_rank=rank, tp_size=tp_size)
        row = RowParallelLinear(8, 6, bias=True, tp_rank=rank, tp_size=tp_size, all_reduce=identity)
        load(col, col.weight, w1), load(col, col.bias, b1)
        load(row, row.weight, w2), load(row, row.bias, b2)
        assert col.weight.shape == (8 // tp_size, 6) and row.weight.shape == (6, 8 // tp_size)
        outs.append(row(col(x)))  # each rank: its slice of h, a partial sum of y
    expected = F.linear(F.linear(x, w1, b1), w2, b2)
    torch.testing.assert_close(sum(outs), expected)  # bias counted once (rank 0)


def test_merged_column_parallel_slices_each_part():
    gate, up = randn(8, 4), randn(8, 4) + 10
    for rank in range(2):
        layer = MergedColumnParallelLinear(4, [8, 8], tp_rank=rank, tp_size=2)
        load(layer, layer.weight, gate, 0), load(layer, layer.weight, up, 1)
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(layer.weight, torch.cat([gate[rows], up[rows]]))
    with pytest.raises(ValueError, match="shard_id in 0..1"):
        load(layer, layer.weight, gate, 2)
    with pytest.raises(ValueError, match=r"checkpoint shape \(6, 4\) does not match"):
        load(layer, layer.weight, gate[:6], 0)


@pytest.mark.parametrize("tp_size, kv_heads_of_rank", [(1, [[0, 1]]), (2, [[0], [1]]),
                                                       (4, [[0], [0], [1], [1]])])
def test_qkv_parallel_gqa_heads_per_rank(tp_size, kv_heads_of_rank):
    """4 query heads, 2 KV heads, head_dim 3; at tp 4 each KV head is replicated on 2 ranks."""
    hd = 3
    q, k, v = randn(12, 5), randn(6, 5) + 10, randn(6, 5) + 20
    for rank in range(tp_size):
        layer = QKVParallelLinear(5, hd, 4, 2, bias=False, tp_rank=rank, tp_size=tp_size)
        for shard_id, tensor in zip("qkv", (q, k, v)):
            load(layer, layer.weight, tensor, shard_id)
        q_heads = list(range(rank * 4 // tp_size, (rank + 1) * 4 // tp_size))
        rows = lambda heads: [h * hd + i for h in heads for i in range(hd)]  # noqa: E731
        kv_rows = rows(kv_heads_of_rank[rank])
        expected = torch.cat([q[rows(q_heads)], k[kv_rows], v[kv_rows]])
        assert torch.equal(layer.weight, expected)
        assert layer.num_kv_heads == len(kv_heads_of_rank[rank])
        got_q, got_k, got_v = layer.split(layer(torch.eye(5)))
        assert got_q.shape[1] == len(q_heads) * hd and got_k.shape[1] == got_v.shape[1]
    with pytest.raises(ValueError, match="shard_id 'q', 'k' or 'v'"):
        load(layer, layer.weight, q, 0)
    with pytest.raises(ValueError, match="neither a divisor nor a multiple"):
        QKVParallelLinear(5, hd, 12, 3, tp_size=4)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        QKVParallelLinear(5, hd, 4, 2, tp_size=8)


def test_invalid_tp_rank_and_replicated_linear():
    with pytest.raises(ValueError, match="invalid tensor-parallel rank 2 of size 2"):
        ColumnParallelLinear(4, 4, tp_rank=2, tp_size=2)
    layer = ReplicatedLinear(4, 3, bias=True, tp_rank=1, tp_size=2)
    w, b = randn(3, 4), randn(3)
    load(layer, layer.weight, w), load(layer, layer.bias, b)
    torch.testing.assert_close(layer(randn(2, 4)), F.linear(randn(2, 4), w, b))


def test_vocab_parallel_embedding_and_lm_head_uneven_vocab():
    """vocab 10 over 3 ranks: 4 rows each, the last rank holds rows 8..9 plus 2 zero rows."""
    table, hidden = randn(10, 6), randn(4, 6)
    ids = torch.tensor([0, 3, 4, 8, 9, 5])
    embeds, logits = [], []
    for rank in range(3):
        emb = VocabParallelEmbedding(10, 6, tp_rank=rank, tp_size=3, all_reduce=identity)
        head = ParallelLMHead(10, 6, tp_rank=rank, tp_size=3)
        load(emb, emb.weight, table), load(head, head.weight, table)
        embeds.append(emb(ids))
        logits.append(F.linear(hidden, head.weight))  # what each rank contributes to the gather
    assert torch.equal(emb.weight[2:], torch.zeros(2, 6))
    torch.testing.assert_close(sum(embeds), F.embedding(ids, table))
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :10], hidden @ table.T)
    # tp 1: plain lookup and matmul, float32 logits; tied head shares the Parameter.
    emb = VocabParallelEmbedding(10, 6, params_dtype=torch.bfloat16)
    load(emb, emb.weight, table)
    head = ParallelLMHead(10, 6, tied_embedding=emb)
    assert head.weight is emb.weight
    out = head(hidden.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (4, 10)
    with pytest.raises(ValueError, match=r"does not match \(vocab_size, hidden_size\)=\(10, 6\)"):
        load(emb, emb.weight, randn(12, 6))


def test_rmsnorm_matches_transformers_and_fuses_residual():
    x, res = randn(7, 32), randn(7, 32) * 3
    ours, ref = RMSNorm(32, eps=1e-5), LlamaRMSNorm(32, eps=1e-5)
    w = torch.rand(32) + 0.5
    load(ours, ours.weight, w)
    ref.weight.data.copy_(w)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    normed, new_res = ours(x, res)
    torch.testing.assert_close(new_res, x + res, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref(x + res), atol=0, rtol=0)
    # bf16: sum in bf16, normalize in fp32, like transformers.
    xb, rb = x.bfloat16(), res.bfloat16()
    ours_b, ref_b = RMSNorm(32, 1e-5, torch.bfloat16), LlamaRMSNorm(32, eps=1e-5).bfloat16()
    torch.testing.assert_close(ours_b(xb, rb)[0], ref_b(xb + rb), atol=0, rtol=0)


@pytest.mark.parametrize("head_dim, rope_scaling", [
    (64, None),
    (16, None),
    (128, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 256}),
    (32, {"rope_type": "linear", "factor": 4.0}),
])
def test_rotary_matches_transformers(head_dim, rope_scaling):
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         rope_theta=500000.0, rope_scaling=rope_scaling,
                         max_position_embeddings=8192)
    theta, scaling = rope_params_from_config(config)
    ours = RotaryEmbedding(head_dim, theta, scaling)
    ref = LlamaRotaryEmbedding(config)
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, atol=0, rtol=0)
    positions = torch.tensor([0, 1, 7, 100, 2047, 5000, 3])
    q, k = randn(7, 4, head_dim), randn(7, 2, head_dim)
    got_q, got_k = ours(positions, q, k)
    cos, sin = ref(q, positions[None])
    # transformers' layout: (batch, heads, seq, head_dim)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_rope_table_rows_are_the_computed_cos_sin():
    """build_table, then cos_sin gathers rows (views with the table's row stride) holding the
    computed values; another dtype than the table's falls back to computing. Exact equality
    is a CUDA property (tests/gpu): on the CPU a vectorized lane may round cos differently in
    the last bit, hence the one-ulp tolerances here."""
    from llmbatch.runtime.layers.rotary import enable_rope_tables

    rope = RotaryEmbedding(64, 500000.0)
    positions = torch.tensor([0, 1, 7, 100, 2047, 4095, 3])
    want = rope.cos_sin(positions, torch.bfloat16)
    assert enable_rope_tables(torch.nn.ModuleList([rope]), 4096, torch.bfloat16) == 1
    assert rope.table.shape == (4096, 2, 32) and rope.table.dtype == torch.bfloat16
    got = rope.cos_sin(positions, torch.bfloat16)
    assert [g.stride() for g in got] == [(64, 32, 1)] * 2
    assert torch.equal(got[0][:, 0], rope.table[positions, 0])
    assert torch.equal(got[1][:, 0], rope.table[positions, 1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=2 ** -8)
    computed = rope.cos_sin(positions, torch.float32)
    assert computed[0].is_contiguous() and computed[0].dtype == torch.float32
    rope.build_table(4096, torch.float32)
    for g, w in zip(rope.cos_sin(positions, torch.float32), computed):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-6)


def test_rotary_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        RotaryEmbedding(16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3 rope_scaling is missing 'low_freq_factor'"):
        RotaryEmbedding(16, 10000.0, {"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(15, 10000.0)


def test_silu_and_mul():
    x = randn(3, 8)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :4]) * x[:, 4:])
    with pytest.raises(ValueError, match="even last dim"):
        SiluAndMul()(randn(3, 7))


def test_lazy_tensor_reads_slices_from_safetensors(tmp_path):
    w = randn(6, 4)
    save_file({"w": w}, str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        lazy = LazyTensor(handle, "w")
        assert lazy.shape == (6, 4)
        row = RowParallelLinear(4, 6, tp_rank=1, tp_size=2, all_reduce=identity)
        load(row, row.weight, lazy)
        assert torch.equal(row.weight, w[:, 2:])
        col = ColumnParallelLinear(4, 6, tp_rank=2, tp_size=3)
        load(col, col.weight, lazy)
        assert torch.equal(col.weight, w[4:])
        assert torch.equal(lazy.load(), w)
