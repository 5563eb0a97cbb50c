"""Structured outputs (vLLM's, on xgrammar): every output of a random tiny model obeys its
request's choice / regex / JSON schema / EBNF grammar, greedy and sampled, under every
scheduling setting; other requests' outputs are unchanged; bad specs are the request's error."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")

from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbatch.runtime.structured_outputs import check_spec  # noqa: E402
from tests.runtime.tiny_models import (ENGINE_SETTINGS, generate, make_prompts,  # noqa: E402
                                       new_engine)

MAX_NEW = 48
CHOICES = ["yes", "no", "maybe so", 'say "hi"']
REGEX = r"[0-9]{3}-[a-c]{2}"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "level": {"enum": ["low", "high"]}},
          "required": ["ok", "level"], "additionalProperties": False}
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= "a" | "bb"'
SPECS = [{"choice": CHOICES}, None, {"regex": REGEX}, {"json": SCHEMA}, {"grammar": GRAMMAR}]


def obeys(spec: dict, text: str) -> bool:
    kind, value = next(iter(spec.items()))
    if kind == "choice":
        return text in value
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "json":
        data = json.loads(text)
        return (set(data) == {"ok", "level"} and isinstance(data["ok"], bool)
                and data["level"] in ("low", "high"))
    return re.fullmatch(r"\((a|bb)(,(a|bb))*\)", text) is not None


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(10, seed=6)


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
@pytest.mark.parametrize("sampled", [False, True])
def test_every_output_obeys_its_spec(llama_setup, prompts, setting, sampled):
    extra = dict(temperature=1.0) if sampled else {}
    specs = [SPECS[i % len(SPECS)] for i in range(len(prompts))]
    reqs = [Request(i, p, SamplingParams(max_new_tokens=MAX_NEW, seed=i, structured_outputs=s,
                                         **extra))
            for i, (p, s) in enumerate(zip(prompts, specs))]
    engine = new_engine(llama_setup, **ENGINE_SETTINGS[setting])
    results = generate(engine, reqs)
    plain = generate(new_engine(llama_setup),
                     [Request(i, p, SamplingParams(max_new_tokens=MAX_NEW, seed=i, **extra))
                      for i, p in enumerate(prompts) if specs[i] is None])
    for i, spec in enumerate(specs):
        r = results[i]
        if spec is None:
            assert r.output_token_ids == plain[i].output_token_ids   # untouched
            continue
        assert r.finish_reason == "stop", (spec, r.output_text)
        assert obeys(spec, r.output_text), (spec, r.output_text)
        assert r.spec_accepted_tokens == 0               # no drafts for a grammar's row
    if "preemption" in setting:
        assert engine.stats()["num_preemptions"] > 0


def test_bad_specs_are_the_request_s_error(llama_setup, prompts):
    results = generate(new_engine(llama_setup), [
        Request("schema", prompts[0], SamplingParams(structured_outputs={"json": "{not json"})),
        Request("grammar", prompts[1], SamplingParams(structured_outputs={"grammar": "root ::="})),
        Request("fine", prompts[2], SamplingParams(max_new_tokens=4,
                                                   structured_outputs={"choice": ["x"]}))])
    assert results["schema"].finish_reason == "error"
    assert results["schema"].error.startswith("structured_outputs.json does not compile: ")
    assert results["grammar"].error.startswith("structured_outputs.grammar does not compile: ")
    assert (results["fine"].finish_reason, results["fine"].output_text) == ("stop", "x")


@pytest.mark.parametrize("spec, message", [
    ({}, "structured_outputs must be a mapping with exactly one of json, json_object, regex, "
         "choice, grammar, got {}"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs must be a mapping with exactly one"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list of non-empty texts, "
                     "got []"),
    ({"json_object": False}, "structured_outputs.json_object must be true, got False"),
])
def test_spec_checks(spec, message):
    with pytest.raises(ValueError) as info:
        check_spec(spec)
    assert str(info.value).startswith(message)
    with pytest.raises(ValueError):
        SamplingParams(structured_outputs=spec)


def test_without_xgrammar_a_structured_request_is_its_error(llama_setup, prompts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xgrammar", None)      # import fails
    results = generate(new_engine(llama_setup), [
        Request("s", prompts[0], SamplingParams(structured_outputs={"choice": ["x"]})),
        Request("p", prompts[1], SamplingParams(max_new_tokens=2))])
    assert results["s"].error == ("structured_outputs needs the xgrammar package: pip install "
                                  "xgrammar (or llmbatch[structured])")
    assert results["p"].finish_reason == "length"
