"""A lone surrogate in a job's text ("\\ud800" in a double-quoted YAML string, an environment
value that was not UTF-8, a str in an API dict) got past validation and failed after the model
loaded: the tokenizer's TypeError on model.system_prompt, exit 1. Now every text value is
checked as it is read (loader.expand_env): exit 2, one line naming the key."""

import pytest

from llmbatch.api import load
from llmbatch.cli import main
from llmbatch.jobs.errors import InvalidJobError

BASE = "model: {path: m}\ninput: {path: x.parquet}\noutput: {path: out}\n"


@pytest.mark.parametrize("text,key,char", [
    (BASE.replace("m}", 'm, system_prompt: "hi \\ud800"}'), "model.system_prompt", "\\ud800"),
    (BASE + 'sampling: {stop: ["a\\udcff"]}\n', "sampling.stop[0]", "\\udcff"),
])
def test_a_lone_surrogate_in_the_job_file(text, key, char, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(text)
    assert main(["run", "job.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {key}: '{char}' at position ") and \
        err.endswith("is not valid Unicode text (a lone surrogate)\n"), err


def test_from_the_environment_and_the_api(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(BASE)
    monkeypatch.setenv("PROMPT", "a\udcff")          # how Python holds a non-UTF-8 byte
    assert main(["run", "job.yaml", "--set", "model.system_prompt=${PROMPT}"]) == 2
    assert "model.system_prompt: '\\udcff' at position 1" in capsys.readouterr().err
    with pytest.raises(InvalidJobError, match=r"^sampling\.stop\[0\]: '\\ud83d' at position 0 "):
        load({"model": {"path": "m"}, "input": {"path": "x.parquet"},
              "output": {"path": "out"}, "sampling": {"stop": ["\ud83d"]}})
    # A surrogate pair written as two escapes is one valid character, not refused.
    spec = load({"model": {"path": "m", "system_prompt": "ok \U0001F600"},
                 "input": {"path": "x.parquet"}, "output": {"path": "out"}})
    assert spec.model.system_prompt == "ok \U0001F600"
