"""Job-file keys that are not strings are named as keys (review, stop 13).

model.chat_template_kwargs is a mapping with string keys; a YAML key that is a number, a
boolean or null ({1: true}, {null: x}) was reported as if it were the value:
'model.chat_template_kwargs: expected a string, got 1'. A non-string key in a section read
'sampling.None: Keys should be strings (got None)' (a key 'None' the user never wrote), and at
the top level 'Keys should be strings', naming neither the place nor the key."""

import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job


def _job(**extra) -> dict:
    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}
    for key, value in extra.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and key in job else value
    return job


def _error(job: dict, sets=()) -> str:
    with pytest.raises(InvalidJobError) as info:
        load_job(job, sets=sets)
    assert info.value.exit_code == 2
    return str(info.value)


@pytest.mark.parametrize("key", [1, None, True])
def test_a_template_variable_that_is_not_a_string(key):
    job = _job(model={"chat_template_kwargs": {key: True}})
    assert _error(job) == f"model.chat_template_kwargs: keys must be strings, got {key!r}"


def test_a_template_variable_key_from_set():
    assert _error(_job(), ["model.chat_template_kwargs={1: true}"]) == \
        "model.chat_template_kwargs: keys must be strings, got 1"


@pytest.mark.parametrize("key", [1, None])
def test_a_section_key_that_is_not_a_string(key):
    assert _error(_job(sampling={key: 2})) == f"sampling: keys must be strings, got {key!r}"


def test_a_top_level_key_that_is_not_a_string():
    assert _error({**_job(), 1: 2}) == "job: keys must be strings, got 1"


def test_string_keys_still_validate():
    spec = load_job(_job(model={"chat_template_kwargs": {"enable_thinking": False}}))
    assert spec.model.chat_template_kwargs == {"enable_thinking": False}
    assert _error(_job(sampling={"temprature": 1})) == \
        "unknown key 'temprature' in section 'sampling' (did you mean 'temperature'?)"


def test_cli_validate_one_line_exit_2(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m, chat_template_kwargs: {1: true}}\n"
                   "input: {path: in.parquet}\noutput: {path: out}\n")
    done = subprocess.run([sys.executable, "-m", "llmbatch.cli", "validate", str(job)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == ("llmbatch: error: model.chat_template_kwargs: keys must be strings, "
                           "got 1\n")
