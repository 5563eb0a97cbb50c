"""prompt_logprobs on the GPU in bfloat16 (Triton attention, chunked prefill) against
transformers' bf16 log_softmax over one forward of each prompt. bf16 rounds differently in two
implementations, so values match within LOGPROB_TOL (nats), not bitwise; a wrong row (a score
taken one position off, a chunk scored twice) is off by whole nats at most positions.
Unmeasured until a GPU session runs it (written 2026-11-27 without a device)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402

LOGPROB_TOL = 0.1
MIN_CLOSE = 0.95


# prefill graphs (engine.prefill_graph_max_tokens, opt-in since stop 22): one sequence at a
# time, so every prompt chunk is scored from a prefill graph's padded hidden states.
SETTINGS = {"default": {}, "prefill-graphs": dict(prefill_graph_max_tokens=64, max_num_seqs=1)}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_prompt_logprobs_bf16_close_to_transformers(tmp_path, tokenizer, setting):
    import transformers as tf

    make_model(tmp_path, arch="llama", num_heads=8, num_kv_heads=2, head_dim=64, hidden=256)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    prompts = make_prompts(16, seed=4)
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="bfloat16",
                                 max_num_batched_tokens=64, **SETTINGS[setting]),
                    tokenizer=tokenizer)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, SamplingParams(max_new_tokens=2, prompt_logprobs=1))
         for i, p in enumerate(prompts)])}
    close = total = 0
    for i, p in enumerate(prompts):
        got = results[i].prompt_logprobs
        assert got[0] is None and len(got) == len(p)
        assert [e["token_id"] for e in got[1:]] == p[1:]
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([p], device="cuda")).logits[0].float(), -1)
        want = [lp[j, p[j + 1]].item() for j in range(len(p) - 1)]
        diffs = [abs(e["logprob"] - w) for e, w in zip(got[1:], want)]
        close += sum(d <= LOGPROB_TOL for d in diffs)
        total += len(diffs)
    assert close / total >= MIN_CLOSE, f"{close}/{total} within {LOGPROB_TOL}"
    if SETTINGS[setting]:   # the path under test was taken: every prefill step a replay
        stats = engine.stats()
        assert stats["prefill_graph_error"] is None and stats["prefill_graph_steps"] > 0, stats
        assert stats["eager_steps"] == 0, stats
