"""Keys users bring from transformers' generate() or vLLM's SamplingParams into `sampling`: one
precise line each instead of difflib's guess ('length_penalty' was told "did you mean
'presence_penalty'?"). A hint that names `n` is given only while the section has `n`."""

import pytest
import yaml

from llmbatch.api import load
from llmbatch.cli import main
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.foreign_keys import foreign_key_hint
from llmbatch.jobs.sampling_section import SamplingSection
from llmbatch.jobs.spec import JobSpec

HAS_N = "n" in SamplingSection.model_fields
needs_n = pytest.mark.skipif(not HAS_N, reason="sampling.n is not in SamplingSection yet")
without_n = pytest.mark.skipif(HAS_N, reason="sampling.n exists: the hint is given")

BEAM = "beam search is not supported; llmbatch samples each row independently"
BEAM_SETTING = "a beam-search setting; beam search is not supported"
TRUNCATION = "not supported; llmbatch truncates with top_p, top_k and min_p"
REPEATS = ("not supported; llmbatch penalizes repeats with repetition_penalty, presence_penalty "
           "and frequency_penalty")
STRUCTURED = "structured output (guided decoding) is not supported"


def _message(section: str, key: str) -> str:
    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"},
           section: {key: 1}}
    with pytest.raises(InvalidJobError) as info:
        load(job)
    return info.value.message


def _valid_keys(section: str) -> str:
    return ", ".join(sorted(JobSpec.model_fields[section].annotation.model_fields))


@pytest.mark.parametrize("key, hint", [
    ("num_beams", BEAM),
    ("use_beam_search", BEAM),
    ("length_penalty", BEAM_SETTING),
    ("early_stopping", BEAM_SETTING),
    ("do_sample", "not needed: temperature 0, the default, is greedy; temperature > 0 samples"),
    ("typical_p", TRUNCATION),
    ("epsilon_cutoff", TRUNCATION),
    ("eta_cutoff", TRUNCATION),
    ("no_repeat_ngram_size", REPEATS),
    ("guided_decoding", STRUCTURED),
    ("response_format", STRUCTURED),
    ("max_tokens", "did you mean 'max_new_tokens'?"),      # difflib's answer is right: kept
    pytest.param("num_return_sequences", "llmbatch calls it 'n'", marks=needs_n),
    pytest.param("best_of", "vLLM's best_of is not supported; sample with 'n' and pick "
                 "downstream", marks=needs_n),
])
def test_foreign_sampling_key(key, hint):
    assert _message("sampling", key) == f"unknown key '{key}' in section 'sampling' ({hint})"


@without_n
def test_without_n_the_normal_path():
    # Until `n` exists, num_return_sequences gets the valid keys, best_of its refusal alone.
    assert _message("sampling", "num_return_sequences") == (
        f"unknown key 'num_return_sequences' in section 'sampling' "
        f"(valid keys: {_valid_keys('sampling')})")
    assert _message("sampling", "best_of") == (
        "unknown key 'best_of' in section 'sampling' (vLLM's best_of is not supported)")


def test_hint_naming_n_needs_n_among_the_valid_keys():
    # Pinned on the function, so it holds whether or not SamplingSection has `n` today.
    assert foreign_key_hint("sampling", "num_return_sequences", ["temperature"]) is None
    assert foreign_key_hint("sampling", "num_return_sequences", ["n"]) == "llmbatch calls it 'n'"
    assert foreign_key_hint("sampling", "best_of", ["temperature"]) == (
        "vLLM's best_of is not supported")
    assert foreign_key_hint("sampling", "best_of", ["n"]) == (
        "vLLM's best_of is not supported; sample with 'n' and pick downstream")


def test_only_the_sampling_section():
    # num_beams elsewhere is no generate() argument put in the wrong place: the valid keys.
    assert foreign_key_hint("engine", "num_beams", ["n"]) is None
    assert _message("engine", "num_beams") == (
        f"unknown key 'num_beams' in section 'engine' (valid keys: {_valid_keys('engine')})")


@pytest.mark.parametrize("how", ["file", "--set"])
def test_cli_validate_prints_the_one_line(tmp_path, monkeypatch, capsys, tiny_tokenizer_dir,
                                          fake_engine_env, jobkit, how):
    monkeypatch.chdir(tmp_path)
    jobkit.write_prompts("in.parquet", 3)
    job = jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out")
    sets = []
    if how == "file":
        job["sampling"]["length_penalty"] = 1.2
    else:
        sets = ["--set", "sampling.length_penalty=1.2"]
    with open("job.yaml", "w") as f:
        yaml.safe_dump(job, f)
    code = main(["validate", "job.yaml", *sets])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: unknown key 'length_penalty' in section 'sampling' "
                   f"({BEAM_SETTING})\n")
