"""sampling.repetition_penalty, presence_penalty, frequency_penalty and min_p in the job file:
their defaults (vLLM's "off"), their ranges (SamplingParams' own: repetition_penalty > 0,
presence/frequency in [-2, 2], min_p in [0, 1]) as one-line errors in the style of top_p's, the
unknown-key hint, --set, `llmbatch validate`, and JobSpec.sampling_params carrying them."""

import copy

import pytest
import yaml

from llmbatch.cli import main
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}
KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "min_p": 0.0}


def job(**sampling):
    d = copy.deepcopy(BASE)
    d["sampling"] = sampling
    return d


def error_of(data, sets=()):
    with pytest.raises(InvalidJobError) as info:
        load_job(data, sets)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    return str(info.value)


def _values(obj):
    return {key: getattr(obj, key) for key in KEYS}


def test_defaults_are_off_in_the_section_and_in_sampling_params():
    spec = load_job(job())
    assert _values(spec.sampling) == NEUTRAL
    assert _values(spec.sampling_params()) == NEUTRAL
    assert spec.sampling_params().has_penalties is False


def test_set_values_reach_sampling_params_as_floats():
    spec = load_job(job(repetition_penalty=2, presence_penalty=-2, frequency_penalty=0.5,
                        min_p=1))
    params = spec.sampling_params(row_seed_offset=4)
    assert _values(params) == {"repetition_penalty": 2.0, "presence_penalty": -2.0,
                               "frequency_penalty": 0.5, "min_p": 1.0}
    assert all(type(v) is float for v in _values(spec.sampling).values())
    assert all(type(v) is float for v in _values(params).values())
    assert params.has_penalties is True


@pytest.mark.parametrize("sampling", [
    {"repetition_penalty": 0.01}, {"repetition_penalty": 100},
    {"presence_penalty": -2}, {"presence_penalty": 2.0},
    {"frequency_penalty": -2.0}, {"frequency_penalty": 2},
    {"min_p": 0}, {"min_p": 1}, {"min_p": 0.05},
])
def test_range_ends_are_accepted(sampling):
    key, value = next(iter(sampling.items()))
    assert getattr(load_job(job(**sampling)).sampling_params(), key) == value


@pytest.mark.parametrize("sampling, message", [
    ({"repetition_penalty": 0}, "sampling.repetition_penalty: must be greater than 0 (got 0)"),
    ({"repetition_penalty": -1.5},
     "sampling.repetition_penalty: must be greater than 0 (got -1.5)"),
    ({"repetition_penalty": float("inf")},
     "sampling.repetition_penalty: must be a finite number (got inf)"),
    ({"repetition_penalty": "high"},
     "sampling.repetition_penalty: expected a number, got 'high'"),
    ({"presence_penalty": 2.5},
     "sampling.presence_penalty: must be less than or equal to 2 (got 2.5)"),
    ({"presence_penalty": True}, "sampling.presence_penalty: expected a number, got True"),
    ({"frequency_penalty": -3},
     "sampling.frequency_penalty: must be greater than or equal to -2 (got -3)"),
    ({"frequency_penalty": float("nan")},
     "sampling.frequency_penalty: must be a finite number (got nan)"),
    ({"min_p": 1.5}, "sampling.min_p: must be less than or equal to 1 (got 1.5)"),
    ({"min_p": -0.1}, "sampling.min_p: must be greater than or equal to 0 (got -0.1)"),
    ({"min_p": None}, "sampling.min_p: expected a number, got None"),
])
def test_bad_values_are_one_line_errors(sampling, message):
    assert error_of(job(**sampling)) == message


@pytest.mark.parametrize("key, meant", [
    ("repetition_penality", "repetition_penalty"), ("presence", "presence_penalty"),
    ("frequency_penality", "frequency_penalty"), ("minp", "min_p"),
])
def test_misspelled_keys_are_told_the_new_ones(key, meant):
    assert error_of(job(**{key: 1.0})) == \
        f"unknown key '{key}' in section 'sampling' (did you mean '{meant}'?)"


def test_set_values():
    spec = load_job(job(), ["sampling.min_p=0.05", "sampling.repetition_penalty=1"])
    assert (spec.sampling.min_p, spec.sampling.repetition_penalty) == (0.05, 1.0)
    spec = load_job(job(min_p=0.2), ["sampling={presence_penalty: -1, frequency_penalty: .5}"])
    assert _values(spec.sampling_params()) == {"repetition_penalty": 1.0,
                                               "presence_penalty": -1.0,
                                               "frequency_penalty": 0.5, "min_p": 0.2}
    assert error_of(job(), ["sampling.min_p=2"]) == \
        "sampling.min_p: must be less than or equal to 1 (got 2)"


def test_validate_shows_them_and_refuses_a_bad_one(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(min_p=0.1)))
    assert main(["validate", str(path), "--set", "sampling.repetition_penalty=1.2"]) == 0
    out, err = capsys.readouterr()
    shown = yaml.safe_load(out)["sampling"]
    assert err == "" and {k: shown[k] for k in KEYS} == {
        "repetition_penalty": 1.2, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "min_p": 0.1}
    assert main(["validate", str(path), "--set", "sampling.presence_penalty=-2.5"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "llmbatch: error: sampling.presence_penalty: must be greater than "
                              "or equal to -2 (got -2.5)\n")
