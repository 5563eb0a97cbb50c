"""EngineConfig.l2_prefetch on a real GPU (layers/l2_prefetch.py, models/llama_prefetch.py):
the touch kernel loads every word on CUDA from its side stream, and an engine with the touch on
generates the same tokens as one with it off, with decode steps replaying CUDA graphs (the
graph capture holds the forked side stream and its join). The speed is bench's job
(`--l2-prefetch`)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.layers import l2_prefetch as lp  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402


def test_touch_loads_every_word_from_the_side_stream():
    n = 300 * lp.BLOCK_WORDS + 11            # more blocks than programs: the loop runs twice
    words = torch.zeros(n, dtype=torch.int32, device="cuda")
    prefetcher = lp.L2Prefetcher(torch.device("cuda"))
    for where in (0, n // 2, n - 1):
        words.zero_()
        words[where] = lp.SENTINEL
        prefetcher.flags.fill_(-1)
        prefetcher.issue(words)
        prefetcher.join()
        programs, _ = lp.grid_size(n)
        expected = torch.zeros(programs, dtype=torch.int32)
        expected[(where // lp.BLOCK_WORDS) % programs] = 1
        assert torch.equal(prefetcher.flags[:programs].cpu(), expected), where


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_tokens_equal_with_the_touch_on(tmp_path, tokenizer, dtype):
    make_model(tmp_path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    prompts = make_prompts(12, seed=5)
    outputs, stats = [], []
    for on in (False, True):
        config = EngineConfig(model=str(tmp_path), device="cuda", dtype=dtype,
                              attention_backend="triton", max_num_seqs=8, kv_cache_blocks=256,
                              l2_prefetch=on)
        engine = Engine(config, tokenizer=tokenizer)
        reqs = [Request(i, p, SamplingParams(max_new_tokens=10, ignore_eos=True))
                for i, p in enumerate(prompts)]
        outputs.append({r.request_id: r.output_token_ids for r in engine.generate(reqs)})
        stats.append(engine.stats())
    assert outputs[1] == outputs[0]
    on = stats[1]
    assert on["l2_prefetch_weights"] == 2 * 2   # the tiny model's 2 layers: qkv + o_proj each
    assert on["cuda_graphs_active"] is True and on["graph_steps"] > 0
    assert stats[0]["l2_prefetch_weights"] == 0
