"""A draft model that cannot be used is reported under speculative.draft_model. A README
check found `speculative.draft_model: ./nodraft` (README: checked at once, as model.path is)
loading the target first and then ending "model.path tiny: cannot load the model: model
directory './nodraft' does not exist", and a draft of another vocabulary blamed on
model.path too."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


def _job(jobkit, tmp_path, model, draft):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    return jobkit.make_job(model, inp, str(tmp_path / "out"),
                           speculative={"method": "draft", "draft_model": draft})


def test_a_missing_local_draft_model_is_refused_before_the_model_loads(tmp_path, jobkit,
                                                                      tiny_tokenizer_dir):
    job = _job(jobkit, tmp_path, tiny_tokenizer_dir, "./no-such-draft")
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=lambda config: pytest.fail("engine built"))
    assert info.value.message == "speculative.draft_model: ./no-such-draft does not exist"
    assert not (tmp_path / "out").exists()


def test_a_draft_of_another_vocabulary_names_speculative_draft_model(tmp_path, jobkit,
                                                                    tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    draft = str(tmp_path / "draft")
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256)
                     ).save_pretrained(draft)
    with pytest.raises(InvalidJobError) as info:
        run_job(_job(jobkit, tmp_path, tiny_llama_dir, draft))
    assert info.value.message.startswith(f"speculative.draft_model {draft}: cannot load the "
                                         f"draft model: draft model vocabulary (500) differs"), \
        info.value.message
