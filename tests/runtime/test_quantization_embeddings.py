"""EngineConfig.quantize_embeddings: the token embedding and LM head in nf4 (layers/
quantization.py Nf4EmbeddingMethod): row lookups, head logits, tied sharing, exact weight
bytes, the engine end to end (exactly an engine whose embedding is its own nf4-dequantized
copy), tensor parallel 2, and the clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmbatch.runtime.layers.quantization import attach_quantization, model_weight_bytes
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.tp_executor import TPExecutor
from tests.runtime.test_quantization import prefill_logits, runner
from tests.runtime.tiny_models import VOCAB, make_model, make_prompts, make_tokenizer

pytest.importorskip("bitsandbytes")

HIDDEN = 128
# Tied, every dimension a multiple of 64 (nf4 linear slices line up at TP 2).
MODEL = dict(arch="llama", hidden=HIDDEN, num_heads=4, num_kv_heads=2, head_dim=32, layers=2,
             tie=True)


def nf4_table_bytes(rows: int, hidden: int) -> int:
    """Packed nibbles plus one float32 absmax per 64 weights."""
    return rows * hidden // 2 + rows * hidden // 64 * 4


class Pair(nn.Module):
    """An embedding and an LM head, tied or not, at one tensor-parallel rank."""

    def __init__(self, vocab, hidden, tie, tp_rank=0, tp_size=1):
        super().__init__()
        self.emb = VocabParallelEmbedding(vocab, hidden, torch.float32, tp_rank, tp_size,
                                          all_reduce=lambda x: x)
        self.head = ParallelLMHead(vocab, hidden, torch.float32, tp_rank, tp_size,
                                   all_gather=lambda x: x,
                                   tied_embedding=self.emb if tie else None)


def quantized_pair(w, tie, head_w=None, tp_rank=0, tp_size=1):
    """A Pair loaded with `w` (and `head_w` when untied) and quantized as the loader would."""
    pair = Pair(w.shape[0], w.shape[1], tie, tp_rank, tp_size)
    assert attach_quantization(pair, "nf4", embeddings=True) == 2
    pair.emb.weight.weight_loader(pair.emb.weight, w)
    if not tie:
        pair.head.weight.weight_loader(pair.head.weight, head_w)
    for module in pair.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return pair


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_rows_and_logits_equal_the_dequantized_table(tie):
    vocab = 300
    w, head_w = randn(vocab, HIDDEN), randn(vocab, HIDDEN, seed=1)
    pair = quantized_pair(w, tie, head_w)
    qm = pair.emb.quant_method
    table = qm.dequantize(pair.emb, torch.float32)       # (vocab, hidden), all rows at once
    head_table = pair.head.quant_method.dequantize(pair.head, torch.float32)
    # nf4 of unit Gaussians: a mean absolute error of about 0.073 (measured).
    assert table.shape == (vocab, HIDDEN) and 0.05 < (table - w).abs().mean() < 0.1
    ids = torch.tensor([5, 0, vocab - 1, 5, 17, 128])
    assert torch.equal(pair.emb(ids), table[ids])
    assert pair.emb(ids[:0]).shape == (0, HIDDEN)
    hidden = randn(7, HIDDEN, seed=2)
    logits = pair.head(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (7, vocab)
    assert torch.equal(logits, F.linear(hidden, head_table))
    # No dense table is left; the tied pair holds one quantized copy, the untied pair two.
    assert pair.emb.weight is None and pair.head.weight is None
    assert list(pair.parameters()) == []
    assert (pair.head.qweight is pair.emb.qweight) == tie
    assert torch.equal(head_table, table) == tie
    assert model_weight_bytes(pair) == (1 if tie else 2) * nf4_table_bytes(vocab, HIDDEN)


def test_tensor_parallel_rows_are_the_full_tables_rows():
    """hidden % 64 == 0: a rank's rows are whole blocks, so quantizing a rank's slice gives the
    full table's blocks; the last rank's padding rows are zeros."""
    vocab = 301  # per rank 151; rank 1 holds 150 rows and one padding row
    w = randn(vocab, HIDDEN)
    full = quantized_pair(w, True)
    full_table = full.emb.quant_method.dequantize(full.emb, torch.float32)
    hidden = randn(3, HIDDEN, seed=2)
    for rank in range(2):
        part = quantized_pair(w, True, tp_rank=rank, tp_size=2)
        start, end = part.emb.vocab_start, part.emb.vocab_end
        table = part.emb.quant_method.dequantize(part.emb, torch.float32)
        assert table.shape == (151, HIDDEN)
        assert torch.equal(table[:end - start], full_table[start:end])
        assert torch.equal(table[end - start:], torch.zeros(151 - (end - start), HIDDEN))
        # Ids of other ranks read as zero rows here (the all-reduce sums the ranks).
        ids = torch.tensor([0, 150, 151, 300])
        own = (ids >= start) & (ids < end)
        expected = full_table[ids] * own.unsqueeze(-1)
        assert torch.equal(part.emb(ids), expected)
        assert torch.equal(part.head(hidden), F.linear(hidden, table))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(tied tiny Llama, the same model with its embedding replaced by its nf4-dequantized
    copy) -- the second, loaded without quantize_embeddings, is what the first should be."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("qe-llama")
    make_model(path, **MODEL)
    make_tokenizer(path)
    rounded = tmp_path_factory.mktemp("qe-llama-rounded")
    for f in path.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, rounded / f.name)
    tensors = load_file(str(path / "model.safetensors"))
    pair = quantized_pair(tensors["model.embed_tokens.weight"], True)
    tensors["model.embed_tokens.weight"] = pair.emb.quant_method.dequantize(
        pair.emb, torch.float32).contiguous()
    save_file(tensors, str(rounded / "model.safetensors"))
    return path, rounded


def greedy(engine, prompts, max_new_tokens=8):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    out = {r.request_id: r.output_token_ids for r in engine.generate(reqs)}
    return [out[i] for i in range(len(prompts))]


def test_engine_equals_an_engine_with_the_dequantized_embedding(checkpoints):
    path, rounded = checkpoints
    qe = runner(path, "nf4", quantize_embeddings=True)
    ref = runner(rounded, "nf4")       # dense (rounded) embedding, nf4 linear layers
    plain = runner(path, "nf4")        # dense (original) embedding
    embed = qe.model.model.embed_tokens
    assert embed.weight is None and qe.model.lm_head.qweight is embed.qweight
    # Exactly the embedding's nf4 bytes fewer than the dense float32 table.
    saved = VOCAB * HIDDEN * 4 - nf4_table_bytes(VOCAB, HIDDEN)
    assert qe.weight_bytes == model_weight_bytes(qe.model) == ref.weight_bytes - saved
    assert plain.weight_bytes == ref.weight_bytes

    prompts = make_prompts(16, seed=3)
    got = prefill_logits(qe, prompts)
    assert got.shape == (sum(map(len, prompts)), VOCAB)
    assert torch.equal(got, prefill_logits(ref, prompts))
    # Against the dense embedding (nf4 linear layers in both), every position of 16 prompts:
    # measured cosine 0.976, top-1 agreement 68.5%. A random tiny model's logits are flat, so
    # the noise moves its argmax far more than a trained model's (nf4 linear layers alone give
    # 58% against the unquantized model, test_quantization.py).
    dense = prefill_logits(plain, prompts)
    agree = (got.argmax(-1) == dense.argmax(-1)).float().mean().item()
    cosine = F.cosine_similarity(got, dense, dim=-1).mean().item()
    assert 0.96 <= cosine < 1.0 and agree >= 0.6, (cosine, agree)

    cfg = dict(device="cpu", dtype="float32", quantization="nf4")
    qe_engine = Engine(EngineConfig(model=str(path), quantize_embeddings=True, **cfg), runner=qe)
    ref_engine = Engine(EngineConfig(model=str(rounded), **cfg), runner=ref,
                        tokenizer=qe_engine.tokenizer)
    out = greedy(qe_engine, prompts)
    assert [len(o) for o in out] == [8] * 16
    assert out == greedy(ref_engine, prompts)
    assert qe_engine.stats()["weight_bytes_per_rank"] == [qe.weight_bytes]


def test_tp2_equals_tp1_with_quantized_embeddings(checkpoints):
    path, _ = checkpoints
    cfg = dict(model=str(path), device="cpu", dtype="float32", quantization="nf4",
               quantize_embeddings=True)
    prompts = make_prompts(8, seed=4)
    single = Engine(EngineConfig(**cfg))
    expected = greedy(single, prompts, 6)
    executor = TPExecutor(EngineConfig(tensor_parallel_size=2, **cfg), timeout_s=60)
    try:
        got = greedy(Engine(EngineConfig(tensor_parallel_size=2, **cfg), runner=executor,
                            tokenizer=single.tokenizer), prompts, 6)
        # Each rank holds half the vocabulary rows of the one shared nf4 table.
        emb_bytes = nf4_table_bytes(VOCAB // 2, HIDDEN)
        assert executor.model.model.embed_tokens.qweight.numel() * 2 == VOCAB // 2 * HIDDEN
        assert len(executor.weight_bytes_per_rank) == 2 and emb_bytes < min(
            executor.weight_bytes_per_rank)
    finally:
        executor.shutdown()
    assert got == expected


@pytest.mark.parametrize("method", ["int8", "none"])
def test_only_nf4_is_accepted(method):
    with pytest.raises(ValueError, match=rf"^quantize_embeddings supports nf4 only, got "
                                         rf"quantization='{method}'$"):
        EngineConfig(model="m", quantization=method, quantize_embeddings=True)
    with pytest.raises(ValueError, match="quantize_embeddings supports nf4 only"):
        attach_quantization(Pair(10, 64, True), method, embeddings=True)


def test_hidden_not_a_multiple_of_64_is_refused():
    with pytest.raises(ValueError, match=r"^quantize_embeddings needs hidden_size divisible by "
                                         r"64, got 96$"):
        attach_quantization(Pair(10, 96, True), "nf4", embeddings=True)


def test_off_by_default_leaves_the_tables_dense():
    pair = Pair(10, 64, False)
    assert EngineConfig(model="m", quantization="nf4").quantize_embeddings is False
    assert attach_quantization(pair, "nf4") == 0
    assert pair.emb.quant_method is None and pair.head.quant_method is None


def test_job_key_maps_to_the_engine_config_and_the_hash():
    from llmbatch.jobs.loader import load_job

    base = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "o"},
            "quantization": {"method": "nf4"}}
    off = load_job(base)
    on = load_job({**base, "quantization": {"method": "nf4", "embeddings": True}})
    assert off.engine_config().quantize_embeddings is False
    assert on.engine_config().quantize_embeddings is True
    # It changes the outputs, so the hash; left at its default, the hash of jobs written
    # before the key existed stays what it was.
    assert on.config_hash(1) != off.config_hash(1)
    explicit_off = load_job({**base, "quantization": {"method": "nf4", "embeddings": False}})
    assert explicit_off.config_hash(1) == off.config_hash(1)
