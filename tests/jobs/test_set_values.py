"""`--set section.key=value` (and run_job's sets=): how the value text is read."""

import copy

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job, parse_set

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def loaded(*sets):
    return load_job(copy.deepcopy(BASE), sets=list(sets))


def error_of(*sets):
    with pytest.raises(InvalidJobError) as info:
        loaded(*sets)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    return str(info.value)


@pytest.mark.parametrize("item, value", [
    # YAML read '#' after a space (or at the start) as a comment: the prompt became null,
    # 'Rule', and stop became null.
    ("model.system_prompt=# Answer briefly", "# Answer briefly"),
    ("model.system_prompt=Rule #1 be brief", "Rule #1 be brief"),
    ("sampling.stop=###", "###"),
    ("model.system_prompt=Reply in C# #fast", "Reply in C# #fast"),
    ("sampling.stop=[a, #b]", "[a, #b]"),
    # A '#' YAML keeps as text leaves the value to YAML as before.
    ("model.system_prompt=C#", "C#"),
    ("sampling.stop=['#', \"b #c\"]", ["#", "b #c"]),
])
def test_a_hash_sign_is_never_a_comment(item, value):
    assert parse_set(item)[1] == value


def test_yaml_values_still_parse():
    spec = loaded('sampling.stop=[a, "b c"]', "sampling.max_new_tokens=8",
                  "engine.prefix_caching=false", "sampling.temperature=0.5",
                  "model.system_prompt=Rule #1: be brief")
    assert spec.sampling.stop == ["a", "b c"]
    assert spec.sampling.max_new_tokens == 8 and spec.engine.prefix_caching is False
    assert spec.sampling.temperature == 0.5
    assert spec.model.system_prompt == "Rule #1: be brief"


def test_a_literal_hash_value_reaches_the_schema_as_written():
    assert loaded("model.system_prompt=# Answer briefly").model.system_prompt == \
        "# Answer briefly"
    # The text the user wrote, not None: one stop string is a list of one.
    assert loaded("sampling.stop=###").sampling.stop == ["###"]
    assert loaded('sampling.stop=["###"]').sampling.stop == ["###"]


def test_a_mapping_for_a_section_sets_its_keys():
    # Failed with "parallel: expected a mapping, got '{tensor_parallel_size: 2}'".
    assert loaded("parallel={tensor_parallel_size: 2}").parallel.tensor_parallel_size == 2
    data = copy.deepcopy(BASE)
    data["sampling"] = {"seed": 3, "max_new_tokens": 5}
    spec = load_job(data, sets=["sampling={max_new_tokens: 8, temperature: 0.5}"])
    # Merged into the section, as keyword overrides are: the job's seed stays.
    assert (spec.sampling.seed, spec.sampling.max_new_tokens, spec.sampling.temperature) == \
        (3, 8, 0.5)
    assert error_of("sampling={temprature: 1}") == \
        "unknown key 'temprature' in section 'sampling' (did you mean 'temperature'?)"
    assert error_of("parallel=2") == "parallel: expected a mapping, got 2"


def test_a_mapping_for_a_text_key_stays_text():
    assert parse_set("model.system_prompt=Be brief: yes")[1] == "Be brief: yes"
    assert parse_set("model.system_prompt={a: 1}")[1] == "{a: 1}"
    assert error_of("modle={path: x}") == \
        "unknown key 'modle' at the top level (did you mean 'model'?)"
