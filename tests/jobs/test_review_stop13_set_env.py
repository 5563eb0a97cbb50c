"""`--set` with an unquoted ${NAME} inside { } or [ ] (review, stop 13).

YAML cannot read `{path: ${MODEL}}` (a '{' inside a flow mapping), so parse_set kept the text,
which env expansion then turned into a text that looks like the mapping it was meant to be:
"model: expected a mapping, got '{path: /models/x}'", and "sampling.stop: expected a list,
got '[x]'". It is now one line saying to quote the ${...}; quoted, it works as before, and a
text key keeps such a value as text."""

import copy
import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def loaded(*sets):
    return load_job(copy.deepcopy(BASE), sets=list(sets))


@pytest.mark.parametrize("item", [
    "model={path: ${MODEL}}",
    "sampling.stop=[${STOP}]",
    "input.path=[${A}, b.parquet]",
    "model.chat_template_kwargs={when: ${WHEN}}",
])
def test_an_unquoted_variable_in_a_mapping_or_list_is_one_line(item, monkeypatch):
    for name in ("MODEL", "STOP", "A", "WHEN"):
        monkeypatch.setenv(name, "x")
    with pytest.raises(InvalidJobError) as info:
        loaded(item)
    assert str(info.value) == (f"--set {item!r}: YAML reads a ${{...}} inside {{ }} or [ ] "
                               f"only quoted: write \"${{NAME}}\"")
    assert info.value.exit_code == 2


def test_quoted_it_expands(monkeypatch):
    monkeypatch.setenv("MODEL", "/models/x")
    monkeypatch.setenv("STOP", "###")
    spec = loaded('model={path: "${MODEL}"}', 'sampling.stop=["${STOP}"]')
    assert (spec.model.path, spec.sampling.stop) == ("/models/x", ["###"])


def test_a_text_key_keeps_it_as_text(monkeypatch):
    monkeypatch.setenv("TAG", "v2")
    spec = loaded("model.system_prompt=[${TAG}] {be brief}", "output.path=${TAG}")
    assert (spec.model.system_prompt, spec.output.path) == ("[v2] {be brief}", "v2")


def test_cli_exit_2_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput: {path: in.parquet}\noutput: {path: out}\n")
    done = subprocess.run([sys.executable, "-m", "llmbatch.cli", "validate", str(job), "--set",
                           "model={path: ${HOME}}"], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (
        2, "llmbatch: error: --set 'model={path: ${HOME}}': YAML reads a ${...} inside { } or "
           "[ ] only quoted: write \"${NAME}\"\n")
