"""`--set` for a text key keeps a number, boolean or date as the text written (review, stop 13).

YAML reads `2024-11-27` as a date, `yes` as true, `0x1F` as 31: '--set output.path=2024-11-27'
failed with 'output.path: expected a string, got datetime.date(2024, 11, 27)', '--set
model.system_prompt=yes' with '... got True' (the user never wrote True), and '--set
output.path=0x1F' was refused as 31. The README's rule for a mapping given for a text key ("for
a text key it is text") now holds for these scalars too; null still means null, lists stay
lists, and keys that are not text still read YAML (max_new_tokens=8, prefix_caching=false)."""

import copy
import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job, parse_set

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def loaded(*sets):
    return load_job(copy.deepcopy(BASE), sets=list(sets))


@pytest.mark.parametrize("item, value", [
    ("output.path=2024-11-27", "2024-11-27"),
    ("output.path=2024-11-27 10:00:00", "2024-11-27 10:00:00"),
    ("output.path=0x1F", "0x1F"),
    ("output.path=1_000", "1_000"),
    ("model.system_prompt=yes", "yes"),
    ("model.system_prompt=No", "No"),
    ("model.system_prompt=3.0", "3.0"),
    ("model.system_prompt= 42 ", "42"),
    ("input.id_column=1", "1"),
    ("input.path=2024", "2024"),          # a str or a list of them: a scalar is text
    ("engine.device=0", "0"),
])
def test_a_scalar_for_a_text_key_is_the_text_written(item, value):
    assert parse_set(item)[1] == value


def test_the_job_gets_the_text():
    spec = loaded("output.path=2024-11-27", "model.system_prompt=yes", "input.id_column=7")
    assert (spec.output.path, spec.model.system_prompt, spec.input.id_column) == \
        ("2024-11-27", "yes", "7")


@pytest.mark.parametrize("item, value", [
    ("model.tokenizer=null", None),
    ("model.system_prompt=~", None),
    ("input.path=[a.parquet, 2024.parquet]", ["a.parquet", "2024.parquet"]),
    ("input.path=[2024]", [2024]),          # inside a list YAML decides, as in a job file
    ("sampling.max_new_tokens=8", 8),
    ("engine.prefix_caching=false", False),
    ("sampling.temperature=0.5", 0.5),
    ("shard.index=1", 1),                   # 'auto' or an integer: not a text key
    ("engine.max_model_len=null", None),
    ("sampling.stop=[yes]", [True]),
])
def test_other_values_are_read_as_yaml(item, value):
    assert parse_set(item)[1] == value


def test_a_typed_key_still_refuses_text():
    with pytest.raises(InvalidJobError) as info:
        loaded("sampling.max_new_tokens=yes")
    assert str(info.value) == "sampling.max_new_tokens: expected an integer, got True"


def test_cli_validate_prints_the_text(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.parquet}\noutput: {path: out}\n")
    done = subprocess.run([sys.executable, "-m", "llmbatch.cli", "validate", str(job),
                           "--set", "output.path=2024-11-27", "--set",
                           "model.system_prompt=yes"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "  path: '2024-11-27'\n" in done.stdout
    assert "  system_prompt: 'yes'\n" in done.stdout
