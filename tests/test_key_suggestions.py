"""Unknown job keys: 'did you mean' only for a plausible key (a typo, a shortened name), else
the section's valid keys. sampling.best_of was told "did you mean 'stop'?"."""

import pytest

from llmbatch.api import load
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.sampling_section import SamplingSection

# The section's keys, sorted, as the hint lists them (pinned by hand it failed every time a
# sampling key was added; the listing's format is what this checks).
SAMPLING_KEYS = ", ".join(sorted(SamplingSection.model_fields))


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
