"""--set values that parse_set took silently (helper review): a key given twice in a mapping
('{n: 2, n: 3}' took the last, where a job file refuses it), and an unclosed [ or { for a key
that takes a list or a mapping ('sampling.stop=[a, b' ran with the one stop string '[a, b').
Text-only keys keep such text as written."""

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import parse_set


@pytest.mark.parametrize("item, message", [
    ("sampling={max_new_tokens: 2, max_new_tokens: 3}",
     "--set 'sampling={max_new_tokens: 2, max_new_tokens: 3}': duplicate key 'max_new_tokens'"),
    ("sampling.stop=[a, b",
     "--set 'sampling.stop=[a, b': the value is not valid YAML (an unclosed [ or {?)"),
    ("input.keep_columns=[x", "--set 'input.keep_columns=[x': the value is not valid YAML"),
    ("sampling.logit_bias={1: 2", "--set 'sampling.logit_bias={1: 2': the value is not valid"),
])
def test_refused(item, message):
    with pytest.raises(InvalidJobError) as info:
        parse_set(item)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("item, value", [
    ("sampling.stop=[a, b]", ["a", "b"]),
    ("sampling.stop=a", "a"),
    ("model.system_prompt=[INST] be brief", "[INST] be brief"),
    ("model.system_prompt={not: closed", "{not: closed"),
])
def test_kept(item, value):
    assert parse_set(item)[1] == value
