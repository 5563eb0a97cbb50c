"""A job gives one config hash whatever the run: no YAML set in it (review, stop 13).

A YAML set (`!!set {a, b}`) iterates in an order that follows PYTHONHASHSEED. As a template
variable it was hashed as its str(); for a list key (sampling.stop, input.keep_columns) pydantic
took it as a list in that order. Either way the same job had another config hash in every
process, so its resume was refused, and keep_columns came out in a changing order. A set
anywhere in a job is now refused at load (one line naming the key, exit 2); lists, mappings and
scalars load and hash as before."""

import os
import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def _kwargs(value) -> dict:
    return {**BASE, "model": {"path": "m", "chat_template_kwargs": value}}


SET = "a set (!!set) has no fixed order, so the config hash would change from run to run; " \
      "use a list"


@pytest.mark.parametrize("job, where", [
    (_kwargs({"tags": {"alpha", "beta"}}), "model.chat_template_kwargs.tags"),
    (_kwargs({"tags": frozenset({"alpha"})}), "model.chat_template_kwargs.tags"),
    (_kwargs({"opts": {"tags": [1, {"x", "y"}]}}), "model.chat_template_kwargs.opts.tags[1]"),
    ({**BASE, "sampling": {"stop": {"a", "b"}}}, "sampling.stop"),
    ({**BASE, "input": {"path": "x.parquet", "keep_columns": {"a", "b"}}},
     "input.keep_columns"),
])
def test_a_set_is_refused(job, where):
    with pytest.raises(InvalidJobError) as info:
        load_job(job)
    assert str(info.value) == f"{where}: {SET}"
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
    assert done.stderr == f"llmbatch: error: model.chat_template_kwargs.tags: {SET}\n"
    job.write_text("model: {path: m}\ninput: {path: in.parquet}\noutput: {path: out}\n"
                   "sampling: {stop: !!set {x, y, z}}\n")
    done = _validate_hash(str(job), "1")
    assert (done.returncode, done.stderr) == (2, f"llmbatch: error: sampling.stop: {SET}\n")
    job.write_text("model: {path: m}\ninput: {path: in.parquet}\noutput: {path: out}\n")
    hashes = set()
    for seed in ("1", "2", "3"):
        done = _validate_hash(str(job), seed, "model.chat_template_kwargs={tags: [a, b, c]}")
        assert done.returncode == 0, done.stderr
        hashes.update(line for line in done.stdout.splitlines() if "config hash" in line)
    assert len(hashes) == 1, hashes
