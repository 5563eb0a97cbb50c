"""With model.chat_template none, the keys only a chat template renders are refused when the job
loads (validate, plan and run alike, exit 2 before the model loads), not after loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job


def _job(model=None, input_=None):
    return {"model": {"path": "m", "chat_template": "none", **(model or {})},
            "input": {"path": "in.parquet", **(input_ or {})},
            "output": {"path": "out"}}


@pytest.mark.parametrize("model, input_, message", [
    ({"system_prompt": "Be brief."}, None,
     "model.system_prompt needs a chat template, but model.chat_template is none"),
    ({"system_prompt": ""}, None,
     "model.system_prompt needs a chat template, but model.chat_template is none"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, None,
     "model.chat_template_kwargs needs a chat template, but model.chat_template is none"),
    (None, {"messages_column": "messages"},
     "input.messages_column needs a chat template, but model.chat_template is none"),
])
def test_refused_at_load(model, input_, message):
    with pytest.raises(InvalidJobError) as info:
        load_job(_job(model, input_))
    assert message in str(info.value)


def test_plain_prompts_and_other_templates_still_load():
    assert load_job(_job()).model.chat_template == "none"
    spec = load_job(_job({"chat_template": "auto", "system_prompt": "Be brief.",
                          "chat_template_kwargs": {"enable_thinking": False}},
                         {"messages_column": "messages"}))
    assert spec.model.system_prompt == "Be brief."


def test_validate_exits_2_with_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m, chat_template: none, system_prompt: hi}\n"
                   "input: {path: in.parquet}\noutput: {path: out}\n")
    proc = subprocess.run([sys.executable, "-m", "llmbatch.cli", "validate", str(job)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llmbatch: error: model.system_prompt needs a chat template, but model.chat_template "
        "is none"]
