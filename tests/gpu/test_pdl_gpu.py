"""EngineConfig.pdl on a real GPU (runtime/pdl.py): with programmatic dependent launch on, our
Triton kernels (fused norms, SiLU·mul, rotary + K/V store, attention, split reduce) wait for
the previous kernel before touching memory, so an engine generates exactly the tokens it does
without PDL, with decode CUDA graphs on (float32 tiny model: no rounding differences). The
speed is bench_batch1's "PDL launches" row."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("programmatic dependent launch needs sm_90+", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime import pdl  # noqa: E402
from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402


def test_engine_tokens_equal_with_pdl_on(tmp_path, tokenizer):
    make_model(tmp_path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    prompts = make_prompts(12, seed=6)
    outputs, stats = [], []
    for on in (False, True):
        config = EngineConfig(model=str(tmp_path), device="cuda", dtype="float32",
                              attention_backend="triton", max_num_seqs=8, kv_cache_blocks=256,
                              pdl=on)
        engine = Engine(config, tokenizer=tokenizer)
        assert pdl.enabled() is on
        reqs = [Request(i, p, SamplingParams(max_new_tokens=10, ignore_eos=True))
                for i, p in enumerate(prompts)]
        outputs.append({r.request_id: r.output_token_ids for r in engine.generate(reqs)})
        stats.append(engine.stats())
    pdl.set_enabled(False)
    assert outputs[1] == outputs[0]
    assert stats[1]["pdl_active"] is True and stats[0]["pdl_active"] is False
    assert stats[1]["cuda_graphs_active"] is True and stats[1]["graph_steps"] > 0
