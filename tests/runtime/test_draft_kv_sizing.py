"""KV pool sizing with a draft model: the target leaves room in its budget for the draft's
weights and for the draft's own pool (as many blocks as the target's), so both together stay
within cpu_kv_cache_bytes (on CUDA: within gpu_memory_utilization)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from llmbatch.runtime.config import EngineConfig, EngineConfigError
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.model_runner import ModelRunner
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

BLOCK = 16
MAX_LEN = 128
BLOCKS_PER_SEQ = MAX_LEN // BLOCK   # 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target = tmp_path_factory.mktemp("target")
    draft = tmp_path_factory.mktemp("draft")
    make_model(target, arch="llama", seed=0)   # 2 layers, 2 KV heads of 16
    # A smaller draft with a different KV shape (1 layer, 1 KV head of 16), same vocabulary.
    make_model(draft, arch="llama", seed=1, hidden=32, layers=1, num_heads=2, num_kv_heads=1)
    return target, draft


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# -- expected sizes, computed from the saved configs and tensors, not from the runtime ---------
def block_bytes(path, elem: int) -> int:
    """K and V, every layer, BLOCK tokens, every KV head."""
    import transformers as tf

    c = tf.AutoConfig.from_pretrained(path)
    return 2 * c.num_hidden_layers * BLOCK * c.num_key_value_heads * c.head_dim * elem


def checkpoint_bytes(path, elem: int) -> int:
    """Elements of every checkpoint tensor, at `elem` bytes each (the engine dtype)."""
    from safetensors import safe_open

    total = 0
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                total += torch.Size(h.get_slice(name).get_shape()).numel()
    return total * elem


def config(target, draft=None, dtype="float32", **kw) -> EngineConfig:
    spec = dict(speculative_method="draft", draft_model=str(draft),
                num_speculative_tokens=3) if draft else {}
    return EngineConfig(model=str(target), device="cpu", dtype=dtype, block_size=BLOCK,
                        max_model_len=MAX_LEN, **spec, **kw)


def pool_bytes(runner) -> int:
    return sum(t.numel() * t.element_size() for kv in runner.kv_caches for t in kv)


def test_sizes_of_the_tiny_models(models):
    target, draft = models
    # Hand-checked: target 2 layers x 2 heads x 16, draft 1 x 1 x 16, float32.
    assert block_bytes(target, 4) == 2 * 2 * 16 * 2 * 16 * 4 == 8192
    assert block_bytes(draft, 4) == 2 * 1 * 16 * 1 * 16 * 4 == 2048


def test_target_leaves_room_for_the_draft(models, tok):
    target, draft = models
    t, d, w = block_bytes(target, 4), block_bytes(draft, 4), checkpoint_bytes(draft, 4)
    budget = w + 30 * (t + d) + 123          # 30 blocks and change
    engine = Engine(config(target, draft, cpu_kv_cache_bytes=budget), tokenizer=tok)
    want = (budget - w) // (t + d)
    assert want == 30
    assert engine.runner.num_kv_blocks == want
    draft_runner = engine.proposer.runner
    assert draft_runner.num_kv_blocks == want          # mirrors the target's layout
    assert draft_runner.weight_bytes == w              # the estimate is what was loaded
    assert pool_bytes(engine.runner) == want * t and pool_bytes(draft_runner) == want * d
    assert pool_bytes(engine.runner) + pool_bytes(draft_runner) + w <= budget
    # The smaller pool still runs requests to completion.
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    reqs = [Request(i, p[:40], params) for i, p in enumerate(make_prompts(4, seed=3))]
    assert [len(r.output_token_ids) for r in engine.generate(reqs)] == [6] * 4


def test_draft_sizing_in_the_engine_dtype(models):
    """bfloat16 engine over float32 checkpoints: 2 bytes per weight and per KV element."""
    target, draft = models
    t, d, w = block_bytes(target, 2), block_bytes(draft, 2), checkpoint_bytes(draft, 2)
    budget = w + 17 * (t + d) + (t + d - 1)
    runner = ModelRunner(config(target, draft, dtype="bfloat16", cpu_kv_cache_bytes=budget))
    assert runner.num_kv_blocks == 17


def test_without_a_draft_the_pool_is_unchanged(models):
    target, _ = models
    t = block_bytes(target, 4)
    runner = ModelRunner(config(target, cpu_kv_cache_bytes=30 * t + t - 1))
    assert runner.num_kv_blocks == 30
    # Capped by what max_num_seqs sequences of max_model_len could ever use.
    runner = ModelRunner(config(target, cpu_kv_cache_bytes=1 << 30, max_num_seqs=3))
    assert runner.num_kv_blocks == 3 * BLOCKS_PER_SEQ + 1
    # ngram speculation has no draft model: nothing is reserved.
    runner = ModelRunner(config(target, cpu_kv_cache_bytes=30 * t, speculative_method="ngram"))
    assert runner.num_kv_blocks == 30


def test_useful_cap_applies_with_a_draft(models):
    target, draft = models
    runner = ModelRunner(config(target, draft, cpu_kv_cache_bytes=1 << 30, max_num_seqs=3))
    assert runner.num_kv_blocks == 3 * BLOCKS_PER_SEQ + 1


def test_budget_too_small_because_of_the_draft_is_refused(models):
    target, draft = models
    t, d, w = block_bytes(target, 4), block_bytes(draft, 4), checkpoint_bytes(draft, 4)
    budget = w + BLOCKS_PER_SEQ * (t + d) - 1     # one block short with the draft
    assert budget // t >= BLOCKS_PER_SEQ            # the target alone would fit
    assert ModelRunner(config(target, cpu_kv_cache_bytes=budget)).num_kv_blocks >= 8
    with pytest.raises(EngineConfigError, match=r"KV cache too small: 7 blocks .*draft model's "
                                         rf"{w} weight bytes.*needs 8; raise cpu_kv_cache_bytes"):
        ModelRunner(config(target, draft, cpu_kv_cache_bytes=budget))
    # Smaller than the draft's weights alone: zero blocks, the same clear error.
    with pytest.raises(EngineConfigError, match=r"KV cache too small: 0 blocks .*draft"):
        ModelRunner(config(target, draft, cpu_kv_cache_bytes=w // 2))


def test_fixed_pool_size_is_not_resized(models):
    target, draft = models
    runner = ModelRunner(config(target, draft, kv_cache_blocks=9, cpu_kv_cache_bytes=1))
    assert runner.num_kv_blocks == 9
