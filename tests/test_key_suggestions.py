"""Unknown job keys: 'did you mean' only for a plausible key (a typo, a shortened name), else
the section's valid keys. sampling.best_of was told "did you mean 'stop'?"."""

import pytest

from llmbatch.api import load
from llmbatch.jobs.errors import InvalidJobError

SAMPLING_KEYS = ("allowed_token_ids, frequency_penalty, ignore_eos, include_stop_str_in_output, "
                 "logit_bias, logprobs, max_new_tokens, min_p, min_tokens, n, per_row, "
                 "presence_penalty, prompt_logprobs, repetition_penalty, seed, "
                 "skip_special_tokens, stop, stop_token_ids, temperature, top_k, top_p, "
                 "truncate_prompt_tokens")


@pytest.mark.parametrize("section, key, hint", [
    # best_of, typical_p and other generate()/SamplingParams keys: tests/jobs/test_foreign_keys.py
    ("sampling", "x", f"valid keys: {SAMPLING_KEYS}"),
    ("sampling", "repeat_penalty", "did you mean 'repetition_penalty'?"),   # llama.cpp's name
    ("sampling", "temprature", "did you mean 'temperature'?"),
    ("sampling", "max_tokens", "did you mean 'max_new_tokens'?"),
    ("sampling", "topk", "did you mean 'top_k'?"),
    ("engine", "prefix_cache", "did you mean 'prefix_caching'?"),
    ("engine", "gpu_mem", "did you mean 'gpu_memory_utilization'?"),    # a shortened name
    ("speculative", "draft", "did you mean 'draft_model'?"),
])
def test_unknown_key_hint(section, key, hint):
    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"},
           section: {key: 1}}
    with pytest.raises(InvalidJobError) as info:
        load(job)
    assert info.value.message == f"unknown key '{key}' in section '{section}' ({hint})"
