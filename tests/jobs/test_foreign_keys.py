"""Keys users bring from transformers' generate() or vLLM's SamplingParams into `sampling`: one
precise line each instead of difflib's guess ('length_penalty' was told "did you mean
'presence_penalty'?")."""

import pytest
import yaml

from llmbatch.api import load
from llmbatch.cli import main
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.foreign_keys import foreign_key_hint
from llmbatch.jobs.spec import JobSpec

BEAM = "beam search is not supported; llmbatch samples each row independently"
BEAM_SETTING = "a beam-search setting; beam search is not supported"
TRUNCATION = "not supported; llmbatch truncates with top_p, top_k and min_p"
REPEATS = ("not supported; llmbatch penalizes repeats with repetition_penalty, presence_penalty "
           "and frequency_penalty")
STRUCTURED = "llmbatch calls it 'structured_outputs' (vLLM's newer name)"


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
    ("response_format", "use structured_outputs: {json: <schema>} or {json_object: true}"),
    ("guided_json", "use structured_outputs: {json: <schema>}"),
    ("guided_choice", "use structured_outputs: {choice: [<text>, ...]}"),
    ("max_tokens", "did you mean 'max_new_tokens'?"),      # difflib's answer is right: kept
    ("num_return_sequences", "llmbatch calls it 'n'"),
    ("best_of", "vLLM's best_of is not supported; sample with 'n' and pick downstream"),
])
def test_foreign_sampling_key(key, hint):
    assert _message("sampling", key) == f"unknown key '{key}' in section 'sampling' ({hint})"


def test_only_the_sampling_section():
    # num_beams elsewhere is no generate() argument put in the wrong place: the valid keys.
    assert foreign_key_hint("engine", "num_beams") is None
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
