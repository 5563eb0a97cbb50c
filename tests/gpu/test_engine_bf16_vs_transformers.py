"""Engine greedy output in bfloat16 on the GPU against transformers in bfloat16 on the same GPU.

Token-for-token equality is what float32 gives (tests/runtime/test_engine_greedy.py); in bf16
two correct implementations round differently (other GEMM kernels, another attention reduction
order), so a near-tie can flip a token and everything after it differs. Two measures, together:

  * teacher forcing: transformers scores OUR prompt + output in one bf16 forward, and every token
    we emitted must be its argmax or within LOGIT_TOL of its top logit. A real bug (K/V in the
    wrong slot, a stale graph buffer, a wrong rotary position) picks tokens several logits below
    the top, which this catches at every position, not only before the first divergence.
  * free-running agreement: >= MIN_MATCH of tokens in common prefixes with transformers'
    generate, so the engine's output is the same text in the ordinary case.

The model's weights are scaled up (tiny_models.make_model) so its logits are peaked: a spread
of several units, against bf16's rounding of ~0.01-0.03 at that magnitude.
"""

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
from tests.runtime.test_prefill_graphs_cpu import expected_prefill_graph_steps  # noqa: E402
from tests.runtime.tiny_models import (  # noqa: E402
    make_model, make_prompts, match_fraction,
)

MAX_NEW = 16
PROMPTS = make_prompts(24, seed=11)
LOGIT_TOL = 0.3
MIN_MATCH = 0.50

MODELS = {
    # name: make_model kwargs
    "llama-gqa-hd64": dict(arch="llama", num_heads=8, num_kv_heads=2, head_dim=64, hidden=256),
    "qwen3-tied-hd128": dict(arch="qwen3", tie=True, num_heads=4, num_kv_heads=1,
                             head_dim=128, hidden=256),
}
SETTINGS = {
    "default": {},
    "graphs-off-no-prefix-cache": dict(cuda_graphs=False, prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=48, max_num_seqs=8),
    # The default (auto) since stop 19 decodes with rotary + K/V store + attention in one
    # launch (rotary_decode.py); the two-launch path (and no gemv weight prefetch) still runs
    # where the one-launch path cannot, and as the engine of stops 17-18.
    "prev-defaults": dict(rotary_in_attention=False, gemv_weight_prefetch="off"),
    # Opt-in since stop 22: one sequence at a time, so every prefill replays a prefill graph
    # (runtime/prefill_graphs.py; prompts of 5-75 tokens, buckets up to 128).
    "prefill-graphs-batch1": dict(prefill_graph_max_tokens=128, max_num_seqs=1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    import transformers as tf

    path = tmp_path_factory.mktemp(request.param)
    make_model(path, **MODELS[request.param])
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    # transformers' free-running output, once per model: the same for every setting, and its
    # 24 x 16 batch-1 generate steps were most of each case's ~11-16 s on the H200 (stop 19,
    # whose time-limited calls reached only the Llama cases).
    return path, hf, hf_generate_one_by_one(hf, PROMPTS)


def hf_generate_one_by_one(hf, prompts):
    """Unpadded batch-1 generate per prompt: no left padding changing transformers' numerics."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


def teacher_forced_gaps(hf, prompts, outputs):
    """Per prompt: (top logit - logit of our token) at each output position, under transformers."""
    gaps = []
    with torch.no_grad():
        for p, out in zip(prompts, outputs):
            ids = torch.tensor([p + out], device="cuda")
            logits = hf(ids).logits[0].float()                  # (len, vocab)
            rows = logits[len(p) - 1: len(p) - 1 + len(out)]    # scores of each output token
            ours = rows.gather(1, torch.tensor(out, device="cuda")[:, None])[:, 0]
            gaps.append((rows.max(dim=1).values - ours).tolist())
    return gaps


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_bf16_greedy_matches_transformers(model, tokenizer, setting):
    path, hf, hf_outputs = model
    prompts = PROMPTS
    engine = Engine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16",
                                 attention_backend="triton", kv_cache_blocks=512,
                                 **SETTINGS[setting]), tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params) for i, p in enumerate(prompts)])}
    assert sorted(results) == list(range(len(prompts)))
    assert not [r.error for r in results.values() if r.error]
    ours = [results[i].output_token_ids for i in range(len(prompts))]
    assert all(len(o) == MAX_NEW for o in ours)
    if SETTINGS[setting].get("prefill_graph_max_tokens"):   # the path under test was taken
        stats = engine.stats()
        assert stats["prefill_graph_error"] is None
        # One step a prompt, a replay but where the decode / verify graphs take it (a
        # 5-token prompt, a 1-token rest after a prefix hit: tests/runtime/
        # test_prefill_graphs_cpu.py's expected_prefill_graph_steps).
        cached = [results[i].num_cached_prompt_tokens for i in range(len(prompts))]
        want = expected_prefill_graph_steps([len(p) for p in prompts], cached, None,
                                            SETTINGS[setting]["prefill_graph_max_tokens"])
        assert stats["prefill_graph_steps"] == want and stats["eager_steps"] == 0, stats

    gaps = teacher_forced_gaps(hf, prompts, ours)
    worst = max((g, i, t) for i, row in enumerate(gaps) for t, g in enumerate(row))
    assert worst[0] <= LOGIT_TOL, (
        f"prompt {worst[1]} token {worst[2]}: our token is {worst[0]:.3f} logits below "
        f"transformers' top choice (tolerance {LOGIT_TOL})")
    frac = match_fraction(ours, hf_outputs)
    print(f"[{setting}] worst teacher-forced gap {worst[0]:.4f}; free-running match {frac:.3f}")
    assert frac >= MIN_MATCH, frac
