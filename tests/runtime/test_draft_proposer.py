"""Draft-model speculative decoding: lossless (greedy and seeded sampling equal speculation
off, also under preemption), and a draft equal to the target gets its drafts accepted."""

from __future__ import annotations

import pytest

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import make_prompts, make_target_and_draft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_target_and_draft(tmp_path_factory)


def run(models, draft=None, sampled=False, **kw):
    target, _, tok = models
    spec = dict(speculative_method="draft", draft_model=str(draft), num_speculative_tokens=3,
                speculative_max_num_seqs=64) if draft else {}
    engine = Engine(EngineConfig(model=str(target), device="cpu", dtype="float32", **spec, **kw),
                    tokenizer=tok)
    prompts = make_prompts(20, seed=11)
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True, seed=i,
                             temperature=0.8 if sampled else 0.0, top_k=5)
              for i in range(len(prompts))]
    res = {r.request_id: r for r in engine.generate(
        [Request(i, p, params[i]) for i, p in enumerate(prompts)])}
    return [res[i].output_token_ids for i in range(len(prompts))], engine.stats()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_draft_speculation_is_lossless(models, sampled):
    target, other, _ = models
    off, _ = run(models, sampled=sampled)
    same, same_stats = run(models, draft=target, sampled=sampled)
    diff, _ = run(models, draft=other, sampled=sampled)
    tight, tight_stats = run(models, draft=target, sampled=sampled, kv_cache_blocks=10)
    assert same == off and diff == off and tight == off
    assert tight_stats["num_preemptions"] > 0
    if not sampled:
        # The target as its own draft proposes exactly its greedy tokens: all are accepted
        # except where max_new_tokens cuts the drafts short.
        total = sum(len(o) for o in off)
        assert same_stats["num_spec_accepted_tokens"] >= 0.5 * total


def test_draft_with_another_vocabulary_is_refused(models, tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        run(models, draft=tmp_path)


def test_draft_with_a_shorter_context_is_refused_without_a_clamp_warning(models, tmp_path,
                                                                          caplog):
    """A draft whose max_position_embeddings is below the target's length is refused before
    its runner exists: the runner would clamp and warn 'using 128' just before the refusal
    (found in review)."""
    import logging

    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llmbatch"):
        with pytest.raises(ValueError, match=f"^draft model {tmp_path}: its context 128 is "
                                             f"shorter than the target's 512; set "
                                             f"engine.max_model_len lower$"):
            run(models, draft=tmp_path)
    assert [r for r in caplog.records if "max_model_len" in r.getMessage()] == []


def test_the_draft_runner_keeps_the_target_engines_process_wide_switches(models):
    """The PDL switch and the gemv weight-prefetch switches are process-wide and set by the
    target's runner (kernel_paths); the draft's runner, built after it, must not reset them:
    a draft the gemv layers do not apply to turned the target's prefetch off while the
    target's stats still reported it. Here the switches are set as a CUDA target sets them,
    then a (CPU) draft runner is built: its kernel_paths call used to reset them first."""
    pytest.importorskip("triton")
    from llmbatch.runtime import pdl
    from llmbatch.runtime.draft_proposer import DraftModelProposer
    from llmbatch.runtime.layers import gemv

    target, draft, _ = models
    config = EngineConfig(model=str(target), device="cpu", dtype="float32",
                          speculative_method="draft", draft_model=str(draft),
                          gemv_weight_prefetch="both")
    try:
        pdl.set_enabled(True)
        gemv.set_weight_prefetch(True)
        gemv.set_weight_prefetch_l2(True)
        proposer = DraftModelProposer(config, 16, 512, _vocab_size(target))
        assert (pdl.enabled(), gemv.weight_prefetch_enabled(),
                gemv.weight_prefetch_l2_enabled()) == (True, True, True)
        # The draft's own figures: on the CPU no path applied to it.
        assert (proposer.runner.pdl_active, proposer.runner.gemv_weight_prefetch) == \
            (False, "off")
    finally:   # process-wide: never leak into other tests
        pdl.set_enabled(False)
        gemv.set_weight_prefetch(False)
        gemv.set_weight_prefetch_l2(False)


def _vocab_size(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["vocab_size"]
