"""Review of structured outputs (2cdffd7): tests for the bugs found (each failed before its
fix), and gap tests for what was checked and found fine."""

from __future__ import annotations

import datetime
import json

import pytest

pytest.importorskip("xgrammar")

from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime import tiny_models  # noqa: E402
from tests.runtime.tiny_models import generate, make_prompts, new_engine  # noqa: E402

EOS = 2


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(8, seed=6)


def replay_accepted(engine, spec, ids) -> list[bool]:
    """Feed `ids` to a fresh matcher of `spec`: whether the grammar accepted each one."""
    m = engine._structured.matcher(spec)
    return [bool(m.accept_token(t)) for t in ids]


# -- found by review (each failed before its fix) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampled", [False, True])
def test_ignore_eos_with_a_grammar_does_not_crash_the_engine(llama_setup, prompts, sampled):
    # Was: once the grammar is complete only EOS is allowed; ignore_eos keeps the request
    # going, append_output_token feeds EOS to the matcher (it terminates), and the next step's
    # fill_next_token_bitmask raises xgrammar's "GrammarMatcher has terminated after accepting
    # the stop token" RuntimeError out of Engine.step: every request of the engine is lost,
    # not just this row. A plain row beside it must still finish.
    extra = dict(temperature=1.0, seed=1) if sampled else {}
    engine = new_engine(llama_setup)
    results = generate(engine, [
        Request("s", prompts[0], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                structured_outputs={"choice": ["x"]}, **extra)),
        Request("p", prompts[1], SamplingParams(max_new_tokens=6, ignore_eos=True))])
    assert results["p"].finish_reason == "length"
    assert results["p"].num_output_tokens == 6
    s = results["s"]
    # The fix: the grammar's end (its EOS) ends the row, ignore_eos or not.
    assert (s.finish_reason, s.output_text, s.output_token_ids[-1]) == ("stop", "x", 2)


@pytest.mark.parametrize("sampled", [False, True])
def test_min_tokens_past_the_grammar_s_end_emits_no_token_the_grammar_refuses(
        llama_setup, prompts, sampled):
    # Was: choice "x" is complete after 1 token, where the grammar allows only EOS; min_tokens=4
    # bans EOS, so the row is all -inf and token 0 (<pad>) is emitted 3 times (ids
    # [90, 0, 0, 0, 2]); accept_token returns False and is ignored (request.py), so the output
    # silently leaves the grammar. Commit b9b8e63 made the same all -inf row (allowed ids all
    # stop ids under min_tokens) the request's error. Wanted: every output token accepted by
    # the grammar, or the request's error.
    extra = dict(temperature=1.0, seed=1) if sampled else {}
    spec = {"choice": ["x"]}
    engine = new_engine(llama_setup)
    r = generate(engine, [Request(0, prompts[0], SamplingParams(
        max_new_tokens=6, min_tokens=4, structured_outputs=spec, **extra))])[0]
    if r.finish_reason != "error":
        assert 0 not in r.output_token_ids, r.output_token_ids
        assert all(replay_accepted(engine, spec, r.output_token_ids)), r.output_token_ids
    assert r.error == ("min_tokens does not apply with structured_outputs (the grammar decides "
                       "where the output ends); set min_tokens to 0")


def test_allowed_token_ids_disjoint_from_the_grammar_is_no_silent_pad_output(llama_setup,
                                                                                prompts):
    # Was (same family): allowed_token_ids [5, 6] and choice "x" share no token: every row is
    # all -inf and the request "finishes" with length and ids [0, 0, 0, 0] (<pad>), no error.
    spec = {"choice": ["x"]}
    engine = new_engine(llama_setup)
    r = generate(engine, [Request(0, prompts[0], SamplingParams(
        max_new_tokens=4, allowed_token_ids=[5, 6], structured_outputs=spec))])[0]
    if r.finish_reason != "error":
        assert r.output_token_ids != [0, 0, 0, 0]
        assert all(replay_accepted(engine, spec, r.output_token_ids)), r.output_token_ids
    assert r.error == ("allowed_token_ids and structured_outputs cannot be combined (the "
                       "grammar decides which tokens may come)")


SCHEMA_ZA = {"type": "object",
             "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
             "required": ["zeta", "alpha"], "additionalProperties": False}


@pytest.mark.parametrize("as_text", [False, True])
def test_json_schema_properties_come_in_schema_order(llama_setup, prompts, as_text):
    # Was: StructuredOutputs._compile dumps a dict schema with sort_keys=True, so the output's
    # properties come in alphabetical order ('{"alpha": ...'), not in the schema's order as in
    # vLLM / xgrammar / OpenAI ('{"zeta": ...'). Order matters to users (a "reasoning" field
    # put before "answer"). The job file's schema and a per-row JSON-text cell (json.loads'd
    # to a dict in sampling_values) both reach the engine as dicts; the same schema as text
    # (runtime API) gives '{"zeta"': two spellings of one schema, two outputs.
    schema = json.dumps(SCHEMA_ZA) if as_text else SCHEMA_ZA
    engine = new_engine(llama_setup)
    r = generate(engine, [Request(0, prompts[0], SamplingParams(
        max_new_tokens=8, structured_outputs={"json": schema}))])[0]
    assert r.output_text.startswith('{"zeta":'), r.output_text


def test_json_object_allows_only_an_object_without_free_whitespace(llama_setup, prompts):
    # Was: {json_object: true} compiles xgrammar's builtin JSON grammar, which accepts a JSON
    # array ("[1]") and free whitespace ('{ ', '{"a":   1}'). README: "any JSON object", and
    # "the JSON has no free whitespace" (vLLM compiles '{"type": "object"}' for json_object).
    engine = new_engine(llama_setup)
    generate(engine, [Request(0, prompts[0], SamplingParams(
        max_new_tokens=1, structured_outputs={"json_object": True}))])   # builds the compiler
    spec = {"json_object": True}
    assert engine._structured.matcher(spec).accept_string("[") is False
    assert engine._structured.matcher(spec).accept_string("{ ") is False
    assert engine._structured.matcher(spec).accept_string('{"a": 1}') is True


def test_a_schema_json_cannot_serialize_is_refused_with_one_line(llama_setup, prompts):
    # Was: StructuredOutputs.matcher built its cache key with json.dumps(spec) outside its
    # try, so a schema value JSON cannot encode (a YAML date in a `default`) raised TypeError
    # out of Engine.generate and the whole run died. Now SamplingParams refuses it (a job's
    # sampling section does the same at load, exit 2).
    schema = {"type": "object", "properties": {"d": {"type": "string",
                                                     "default": datetime.date(2024, 1, 1)}}}
    with pytest.raises(ValueError, match="structured_outputs.json is not JSON: Object of type "
                                         "date is not JSON serializable"):
        SamplingParams(structured_outputs={"json": schema})
    results = generate(new_engine(llama_setup), [
        Request("ok", prompts[1], SamplingParams(max_new_tokens=2))])
    assert results["ok"].finish_reason == "length"


# -- gaps: checked and fine (these pass) ------------------------------------------------------

@pytest.mark.parametrize("choice", ['a"b', "c\\d", "e\nf", "ü日本", "tab\there", "\x01z",
                                    "x\\n", "[]|()"])
def test_choice_with_special_characters_is_emitted_exactly(llama_setup, prompts, choice):
    r = generate(new_engine(llama_setup), [Request(0, prompts[0], SamplingParams(
        max_new_tokens=16, structured_outputs={"choice": [choice]}))])[0]
    assert (r.finish_reason, r.output_text, r.output_token_ids[-1]) == ("stop", choice, EOS)


def test_cache_keeps_dict_and_text_and_reordered_specs_apart(llama_setup, prompts):
    # Specs that look alike never share a compiled grammar wrongly: each output obeys its own.
    specs = {"a": {"choice": ["ab"]}, "b": {"choice": ["a", "b"]},
             "c": {"regex": "ab"}, "d": {"grammar": 'root ::= "ab"'},
             "e": {"choice": ['a"b']}, "f": {"choice": ["a\\", "b"]}}
    results = generate(new_engine(llama_setup), [
        Request(k, prompts[0], SamplingParams(max_new_tokens=6, structured_outputs=s))
        for k, s in specs.items()])
    for k in ("a", "c", "d"):
        assert results[k].output_text == "ab"
    assert results["b"].output_text in ("a", "b")
    assert results["e"].output_text == 'a"b'
    assert results["f"].output_text in ("a\\", "b")


def test_logprobs_of_a_structured_row_are_the_raw_logits(llama_setup, prompts):
    # The sampled token is the grammar's, its logprob that of the unmasked distribution
    # (sampler.py: logprobs stay those of the raw logits, vLLM's default).
    r = generate(new_engine(llama_setup), [Request(0, prompts[0], SamplingParams(
        max_new_tokens=4, logprobs=2, structured_outputs={"choice": ["x"]}))])[0]
    assert r.output_text == "x"
    first = r.logprobs[0]
    assert first["token_id"] == r.output_token_ids[0]
    assert len(first["top"]) == 2 and first["logprob"] < 0.0


def test_padded_model_vocabulary_larger_than_the_tokenizer_s(tmp_path, monkeypatch, prompts):
    # lm_head of 400 rows over a 384-token tokenizer: the bitmask spans 400 logits and ids
    # 384..399 are never allowed.
    tok = tiny_models.make_tokenizer(tmp_path / "t")
    monkeypatch.setattr(tiny_models, "VOCAB", 400)
    tiny_models.make_model(tmp_path / "m", eos_token_id=EOS)
    setup = (tmp_path / "m", tok)
    engine = new_engine(setup)
    assert engine.vocab_size == 400
    reqs = [Request(i, [p for p in pr if p < 384], SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=i, structured_outputs={"regex": "[0-9]{3}"}))
        for i, pr in enumerate(prompts[:4])]
    for r in generate(engine, reqs).values():
        assert r.finish_reason == "stop" and len(r.output_text) == 3 and r.output_text.isdigit()
        assert all(t < 384 for t in r.output_token_ids)


def test_draft_model_speculation_mixing_structured_and_plain_rows(llama_setup, prompts):
    # Draft = target: plain rows accept drafts, structured rows get none; plain outputs equal
    # speculation off, structured ones obey their spec.
    path, _ = llama_setup
    specs = [{"regex": "[a-c]{2}-[0-9]{2}"} if i % 2 else None for i in range(len(prompts))]

    def reqs():
        return [Request(i, p, SamplingParams(max_new_tokens=10, structured_outputs=s))
                for i, (p, s) in enumerate(zip(prompts, specs))]

    off = generate(new_engine(llama_setup), reqs())
    engine = new_engine(llama_setup, speculative_method="draft", draft_model=str(path),
                        num_speculative_tokens=3, speculative_max_num_seqs=64)
    on = generate(engine, reqs())
    for i, s in enumerate(specs):
        assert on[i].output_token_ids == off[i].output_token_ids
        if s is not None:
            assert on[i].spec_accepted_tokens == 0
            assert on[i].finish_reason == "stop" and len(on[i].output_text) == 5
    assert sum(on[i].spec_accepted_tokens for i, s in enumerate(specs) if s is None) > 0


def test_tensor_parallel_2_structured_output_equals_tp1(llama_setup, prompts):
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.tp_executor import TPExecutor

    path, tok = llama_setup
    specs = [{"json": {"type": "object", "properties": {"n": {"type": "integer"}},
                       "required": ["n"], "additionalProperties": False}},
             {"choice": ["yes", "no"]}, None, {"regex": "[0-9]{3}"}]

    def reqs():
        return [Request(i, prompts[i], SamplingParams(max_new_tokens=12, temperature=1.0,
                                                      seed=i, structured_outputs=s))
                for i, s in enumerate(specs)]

    def cfg(tp):
        return EngineConfig(model=str(path), device="cpu", dtype="float32",
                            tensor_parallel_size=tp)

    single = generate(Engine(cfg(1), tokenizer=tok), reqs())
    executor = TPExecutor(cfg(2), timeout_s=60)
    try:
        tp2 = generate(Engine(cfg(2), runner=executor, tokenizer=tok), reqs())
    finally:
        executor.shutdown()
    assert [tp2[i].output_token_ids for i in range(4)] == \
        [single[i].output_token_ids for i in range(4)]
    assert [tp2[i].finish_reason for i in range(4)] == [single[i].finish_reason
                                                       for i in range(4)]


def test_stop_string_and_max_new_tokens_inside_the_structure(llama_setup, prompts):
    # A stop string inside the structure ends it there (stop); max_new_tokens mid-structure
    # ends it with length: the matcher is left unfinished, nothing raises.
    spec = {"regex": "[0-9]{3}-[a-c]{2}"}
    results = generate(new_engine(llama_setup), [
        Request("stop", prompts[0], SamplingParams(max_new_tokens=16, stop=["-"],
                                                   structured_outputs=spec)),
        Request("len", prompts[1], SamplingParams(max_new_tokens=2, structured_outputs=spec)),
        Request("full", prompts[0], SamplingParams(max_new_tokens=16, structured_outputs=spec))])
    s, n, f = results["stop"], results["len"], results["full"]
    assert (s.finish_reason, s.stop_reason, len(s.output_text)) == ("stop", "-", 3)
    assert s.output_text.isdigit()
    assert (n.finish_reason, n.num_output_tokens) == ("length", 2)
    assert f.finish_reason == "stop" and f.output_token_ids[-1] == EOS
    assert f.output_text[:3] == s.output_text   # same greedy path up to the stop string


def test_stop_token_ids_with_a_grammar_and_ignore_eos_stop_on_that_id(llama_setup, prompts):
    # The grammar's end allows only EOS (2); stop_token_ids [2] ends it even with ignore_eos.
    r = generate(new_engine(llama_setup), [Request(0, prompts[0], SamplingParams(
        max_new_tokens=8, stop_token_ids=[EOS], ignore_eos=True,
        structured_outputs={"choice": ["xy"]}))])[0]
    assert (r.finish_reason, r.output_text, r.stop_reason) == ("stop", "xy", EOS)
