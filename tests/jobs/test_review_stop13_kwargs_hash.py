"""model.chat_template_kwargs gives one config hash per job, whatever the run (review, stop 13).

A YAML set (`!!set {a, b}`) was accepted as a template variable and hashed as its str(), whose
order follows PYTHONHASHSEED: the same job had another config hash in every process, so its
resume was refused ("written with different settings: model.chat_template_kwargs.tags
{'a', 'b'} -> {'b', 'a'}"), and a template iterating the set rendered rows in a changing order.
A set is now refused at load (one line, exit 2); lists, mappings and scalars hash as before."""

import os
import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def _kwargs(value) -> dict:
    return {**BASE, "model": {"path": "m", "chat_template_kwargs": value}}


@pytest.mark.parametrize("value, where", [
    ({"tags": {"alpha", "beta"}}, "'tags'"),
    ({"tags": frozenset({"alpha"})}, "'tags'"),
    ({"opts": {"tags": [1, {"x", "y"}]}}, "'opts'"),
])
def test_a_set_is_refused(value, where):
    with pytest.raises(InvalidJobError) as info:
        load_job(_kwargs(value))
    assert str(info.value) == (
        f"model.chat_template_kwargs: {where} holds a set, whose order changes from run to "
        f"run; use a list")
    assert info.value.exit_code == 2


def test_lists_mappings_and_scalars_are_kept():
    value = {"enable_thinking": False, "tags": ["b", "a"], "opts": {"n": 1, "when": None}}
    assert load_job(_kwargs(value)).model.chat_template_kwargs == value


def _validate_hash(job: str, seed: str, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "llmbatch.cli", "validate", job, *args],
                          capture_output=True, text=True, env=env)


def test_cli_refuses_a_yaml_set_and_hashes_a_list_alike_in_every_process(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.parquet}\noutput: {path: out}\n")
    done = _validate_hash(str(job), "1", "model.chat_template_kwargs={tags: !!set {a, b, c}}")
    assert done.returncode == 2
    assert done.stderr == ("llmbatch: error: model.chat_template_kwargs: 'tags' holds a set, "
                           "whose order changes from run to run; use a list\n")
    hashes = set()
    for seed in ("1", "2", "3"):
        done = _validate_hash(str(job), seed, "model.chat_template_kwargs={tags: [a, b, c]}")
        assert done.returncode == 0, done.stderr
        hashes.update(line for line in done.stdout.splitlines() if "config hash" in line)
    assert len(hashes) == 1, hashes
