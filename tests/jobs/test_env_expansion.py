"""${VAR} expansion in job values: the shell's meaning for the forms we take, refusal for others."""

import copy

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import expand_env, load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def output_path(value):
    data = copy.deepcopy(BASE)
    data["output"]["path"] = value
    return load_job(data).output.path


def error_of(value):
    with pytest.raises(InvalidJobError) as info:
        output_path(value)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    return str(info.value)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("LB_SET", "/set")
    monkeypatch.setenv("LB_EMPTY", "")
    monkeypatch.delenv("LB_UNSET", raising=False)


@pytest.mark.parametrize("value, expanded", [
    ("${LB_SET}/a", "/set/a"),
    ("${LB_SET:-/x}", "/set"),
    ("${LB_UNSET:-/x}", "/x"),
    # As in the shell: ':-' takes the default when the variable is unset or empty ...
    ("${LB_EMPTY:-/x}", "/x"),
    # ... '-' only when it is unset.
    ("${LB_UNSET-/y}", "/y"),
    ("${LB_SET-/y}", "/set"),
    ("out${LB_EMPTY-/y}", "out"),
    ("$${LB_SET}", "${LB_SET}"),
    ("cost $5", "cost $5"),          # only ${...} is expanded; a bare $ is text
])
def test_supported_forms_as_in_the_shell(env, value, expanded):
    assert output_path(value) == expanded


@pytest.mark.parametrize("value", [
    "${LB_SET",                       # unclosed
    "${LB_UNSET:-${LB_SET:-/tmp/x}}",  # nested: became a literal folder name
    "${LB_SET:=/z}",
    "${LB_SET:?no}",
    "${}",
    "a/${1}",
])
def test_unsupported_forms_are_refused(env, value):
    assert error_of(value) == (
        f"output.path: unsupported ${{...}} form in {value!r}; use ${{NAME}}, ${{NAME:-default}} "
        f"or ${{NAME-default}} (no $, {{ or }} in the default; $${{ is a literal ${{)")


def test_unset_variable_without_default(env):
    assert error_of("${LB_UNSET}/a") == "output.path: environment variable LB_UNSET is not set"
    # An empty variable is set: it expands to '' as in the shell.
    assert expand_env("a${LB_EMPTY}b") == "ab"
