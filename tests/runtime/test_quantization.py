"""bitsandbytes int8 / nf4 at load time: weight bytes, closeness to the unquantized model,
nf4 slices that line up with quantize-then-slice, TP 2 with nf4, and the clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from llmbatch.runtime.layers.quantization import (BnbLinearMethod, attach_quantization,
                                                  linear_weight_bytes, model_weight_bytes)
from llmbatch.runtime.loader import load_weights
from llmbatch.runtime.model_runner import ModelRunner, StepInputs
from llmbatch.runtime.models.registry import build_model
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.tp_executor import TPExecutor
from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

pytest.importorskip("bitsandbytes")

# Every dimension a multiple of 64, so nf4 blocks line up at TP 2 (see layers/quantization.py).
MODEL = dict(arch="llama", hidden=128, num_heads=4, num_kv_heads=2, head_dim=32, layers=2)
# Mean cosine similarity of the logits to the unquantized model's, every position of 8 prompts
# (367 rows). Measured: int8 0.99972 (top-1 agreement 96%), nf4 0.9503 (top-1 58%): a random
# tiny model has flat logits, so 4-bit noise moves its argmax far more than a trained model's.
MIN_COSINE = {"nf4": 0.93, "int8": 0.999}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-llama")
    hf = make_model(path, **MODEL)
    make_tokenizer(path)
    return path, hf.config


def runner(path, quantization, **kw):
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    quantization=quantization, kv_cache_blocks=64, **kw))


def prefill_logits(r, prompts):
    """Logits (num_tokens, vocab) at every position of `prompts`, one prefill step."""
    bs = r.block_size
    s = StepInputs([], [], [], [0], [], [], [], [], [])
    next_block = 0
    for p in prompts:
        table = list(range(next_block, next_block + -(-len(p) // bs)))
        next_block += len(table)
        start = s.query_start_loc[-1]
        s.input_ids += p
        s.positions += range(len(p))
        s.slot_mapping += [table[i // bs] * bs + i % bs for i in range(len(p))]
        s.seq_lens.append(len(p))
        s.block_tables.append(table)
        s.query_start_loc.append(start + len(p))
        s.sample_rows += range(start, start + len(p))
    return r.forward_logits(s)


@pytest.fixture(scope="module")
def runners(checkpoint):
    path, _ = checkpoint
    return {q: runner(path, q) for q in ("none", "int8", "nf4")}


def test_weight_bytes_of_linear_layers(runners):
    dense_bytes, numel = linear_weight_bytes(runners["none"].model)
    assert dense_bytes == 4 * numel  # float32 model
    bf16 = 2 * numel
    ratios = {q: linear_weight_bytes(runners[q].model)[0] / bf16 for q in ("int8", "nf4")}
    # nf4: 0.5 byte + one float32 absmax per 64 weights; int8: 1 byte + a float32 per row.
    assert ratios["nf4"] == pytest.approx((0.5 + 4 / 64) / 2)
    assert ratios["nf4"] <= 0.30 and ratios["int8"] <= 0.55
    for q in ("int8", "nf4"):
        model = runners[q].model
        assert runners[q].weight_bytes == model_weight_bytes(model) < runners["none"].weight_bytes
        assert runners[q].weight_bytes_per_rank == [runners[q].weight_bytes]
        # Embedding and LM head stay in the model dtype; the linear layers hold no dense weight.
        assert model.model.embed_tokens.weight.dtype == torch.float32
        assert model.lm_head.weight.dtype == torch.float32
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight is None and qkv.qweight.dtype == (torch.uint8 if q == "nf4"
                                                             else torch.int8)


def test_quantized_logits_stay_close(runners):
    prompts = make_prompts(8, seed=1)
    ref = prefill_logits(runners["none"], prompts)
    for q in ("int8", "nf4"):
        got = prefill_logits(runners[q], prompts)
        assert got.shape == ref.shape == (sum(map(len, prompts)), 384)
        cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
        assert MIN_COSINE[q] <= cosine < 1.0, (q, cosine)


def dequantized_slice_check(make_layer, parts: dict, tp_size: int):
    """For each rank: dequantize(quantize(rank slice)) vs slice(dequantize(quantize(full)))."""
    quant = BnbLinearMethod("nf4")
    full = make_layer(0, 1)
    for shard_id, tensor in parts.items():
        full.weight.weight_loader(full.weight, tensor, shard_id)
    quant.process_weights_after_loading(full)
    full_deq = quant.dequantize(full, torch.float32)
    # The dequantized full weight, cut back into its checkpoint parts.
    sizes = [t.shape[0] for t in parts.values()]
    full_parts = dict(zip(parts, full_deq.split(sizes))) if len(parts) > 1 else {
        next(iter(parts)): full_deq}
    results = []
    for rank in range(tp_size):
        quantized, expected = make_layer(rank, tp_size), make_layer(rank, tp_size)
        for shard_id in parts:
            quantized.weight.weight_loader(quantized.weight, parts[shard_id], shard_id)
            expected.weight.weight_loader(expected.weight, full_parts[shard_id], shard_id)
        quant.process_weights_after_loading(quantized)
        results.append((quant.dequantize(quantized, torch.float32), expected.weight.data))
    return results


def test_nf4_slices_line_up_with_quantize_then_slice():
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cases = {
        "qkv": (lambda r, t: QKVParallelLinear(128, 32, 4, 2, tp_rank=r, tp_size=t),
                {"q": randn(128, 128), "k": randn(64, 128), "v": randn(64, 128)}),
        "gate_up": (lambda r, t: MergedColumnParallelLinear(128, [256, 256], tp_rank=r,
                                                            tp_size=t),
                    {0: randn(256, 128), 1: randn(256, 128)}),
        "down": (lambda r, t: RowParallelLinear(256, 128, tp_rank=r, tp_size=t),
                 {None: randn(128, 256)}),
    }
    for name, (make_layer, parts) in cases.items():
        for got, expected in dequantized_slice_check(make_layer, parts, 2):
            assert torch.equal(got, expected), name
    # A row-parallel slice of 32 columns cuts the full tensor's 64-blocks in half: each rank
    # quantizes its slice on its own 64-element blocks (two half-rows each) -- not identical to
    # quantize-then-slice, and no less accurate.
    w = randn(128, 64)
    make_row = lambda r, t: RowParallelLinear(64, 128, tp_rank=r, tp_size=t)  # noqa: E731
    for rank, (got, expected) in enumerate(dequantized_slice_check(make_row, {None: w}, 2)):
        true = w[:, rank * 32:(rank + 1) * 32]
        assert not torch.equal(got, expected)
        assert (got - true).abs().mean() < 1.2 * (expected - true).abs().mean()


def test_tp2_nf4_equals_tp1_nf4(checkpoint, runners):
    path, hf_config = checkpoint
    prompts = make_prompts(32, seed=2)
    tok_cfg = dict(model=str(path), device="cpu", dtype="float32", quantization="nf4")

    def generate(engine):
        reqs = [Request(i, p, SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts)]
        out = {r.request_id: r.output_token_ids for r in engine.generate(reqs)}
        return [out[i] for i in range(len(prompts))]

    single = Engine(EngineConfig(**tok_cfg), runner=runners["nf4"])
    expected = generate(single)
    executor = TPExecutor(EngineConfig(tensor_parallel_size=2, **tok_cfg), timeout_s=60)
    try:
        got = generate(Engine(EngineConfig(tensor_parallel_size=2, **tok_cfg), runner=executor,
                              tokenizer=single.tokenizer))
        per_rank = []
        for rank in range(2):
            model = build_model(hf_config, "float32", "cpu", rank, 2)
            attach_quantization(model, "nf4", hf_config)
            load_weights(model, str(path))
            per_rank.append(model_weight_bytes(model))
        assert executor.weight_bytes_per_rank == per_rank
    finally:
        executor.shutdown()
    assert got == expected


def test_missing_bitsandbytes_is_one_clear_error(checkpoint, monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"^quantization needs bitsandbytes, which is not "
                                          r"installed: pip install bitsandbytes$"):
        runner(checkpoint[0], "nf4")


def test_prequantized_fp4_checkpoint_is_refused(checkpoint, tmp_path):
    """nf4/int8 checkpoints load (test_bnb_checkpoint.py); 4-bit fp4 (the default quant type
    when none is given) is refused."""
    path, _ = checkpoint
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bitsandbytes 4-bit 'fp4'; only nf4 is supported"):
        runner(tmp_path, "none")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="quantization method 'fp8' is not one of int8, nf4"):
        BnbLinearMethod("fp8")


def test_importing_bitsandbytes_does_not_warn_about_the_optional_cpu_kernel():
    """On CPUs with avx512bf16 (this project's CI machines) bitsandbytes warns at import that
    the optional `kernels` package is missing, on stderr of every int8/nf4 CPU job (found by a
    user-acceptance test). import_bnb silences that one logger during the import, and puts its
    level back."""
    import subprocess
    import sys

    code = ("import logging; from llmbatch.runtime.layers.quantization import import_bnb, "
            "_BNB_CPU_LOGGER; import_bnb(); "
            "assert logging.getLogger(_BNB_CPU_LOGGER).level == logging.NOTSET")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr
