"""sampling.structured_outputs in a job: job-wide and per row (a JSON text column), on the
runtime engine with a random tiny model: every row obeys its spec."""

import json
import re

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import load
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError

BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "o"}}
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}},
          "required": ["label"], "additionalProperties": False}


def test_job_wide_and_per_row_specs(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    pytest.importorskip("xgrammar")
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    path = str(tmp_path / "in.parquet")
    per_row = [None, json.dumps({"regex": "[0-9]{4}"}), json.dumps({"choice": ["red", "blue"]}),
               "not json", json.dumps({"choice": []})]
    pq.write_table(pa.table({"prompt": ["a", "b c", "d e f", "g", "h"],
                             "structured_outputs": per_row}), path)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, path, out, engine={"kv_cache_blocks": 32, "device": "cpu"},
        sampling={"max_new_tokens": 40, "structured_outputs": {"json": SCHEMA},
                  "per_row": ["structured_outputs"]}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert json.loads(rows[0]["output_text"])["label"] in ("spam", "ham")   # the job's
    assert re.fullmatch("[0-9]{4}", rows[1]["output_text"])
    assert rows[2]["output_text"] in ("red", "blue")
    assert rows[3]["error"] == ("invalid per-row sampling value: structured_outputs must be the "
                                "JSON text of a structured_outputs mapping, got 'not json'")
    assert rows[4]["error"] == ("invalid per-row sampling value: structured_outputs.choice must "
                                "be a non-empty list of non-empty texts, got []")
    assert [r["finish_reason"] for r in rows] == ["stop", "stop", "stop", "error", "error"]
    assert (result.num_rows_ok, result.num_rows_error) == (3, 2)


def test_section_checks_and_hash():
    plain = load(BASE).config_hash(1)
    spec = load({**BASE, "sampling": {"structured_outputs": {"choice": ["a", "b"]}}})
    assert spec.config_hash(1) != plain
    assert load({**BASE, "sampling": {"structured_outputs": None}}).config_hash(1) == plain
    with pytest.raises(InvalidJobError) as info:
        load({**BASE, "sampling": {"structured_outputs": {"regex": "a", "choice": ["a"]}}})
    assert info.value.message.startswith(
        "sampling.structured_outputs: structured_outputs must be a mapping with exactly one of "
        "json, json_object, regex, choice, grammar")


def test_a_column_of_another_type_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                             fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "structured_outputs": [3]}), path)
    with pytest.raises(InvalidInputError) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                                sampling={"per_row": ["structured_outputs"]}))
    assert info.value.message == ("sampling.per_row: column 'structured_outputs' is int64; "
                                  "expected a string column (the JSON text of a "
                                  "structured_outputs mapping)")


def test_schema_order_is_kept_and_hashed():
    za = {"type": "object", "properties": {"zeta": {"type": "integer"},
                                           "alpha": {"type": "integer"}}}
    az = {"type": "object", "properties": {"alpha": {"type": "integer"},
                                           "zeta": {"type": "integer"}}}
    a = load({**BASE, "sampling": {"structured_outputs": {"json": za}}})
    b = load({**BASE, "sampling": {"structured_outputs": {"json": az}}})
    # Stored as JSON text in the schema's order (the output's properties follow it).
    assert a.sampling_params().structured_outputs == {"json": json.dumps(za)}
    assert a.config_hash(1) != b.config_hash(1)


@pytest.mark.parametrize("extra, message", [
    ({"min_tokens": 2}, "sampling.min_tokens does not apply with structured_outputs (the "
                        "grammar decides where the output ends); set it to 0"),
    ({"allowed_token_ids": [3]}, "sampling.allowed_token_ids and structured_outputs cannot be "
                                 "combined (the grammar decides which tokens may come)"),
])
def test_job_wide_combinations_that_fight_the_grammar_are_refused(extra, message):
    with pytest.raises(InvalidJobError) as info:
        load({**BASE, "sampling": {"structured_outputs": {"choice": ["a"]}, **extra}})
    assert info.value.message == message


@pytest.mark.parametrize("spec,message", [
    ({"regex": "[a-"}, "sampling.structured_outputs: structured_outputs.regex does not compile"),
    ({"grammar": "root ::= nope"},
     "sampling.structured_outputs: structured_outputs.grammar does not compile"),
])
def test_a_job_wide_spec_that_does_not_compile_refuses_the_job(tmp_path, tiny_llama_dir, jobkit,
                                                               monkeypatch, spec, message):
    """Every row would be an error row (exit 3) after the whole job ran: it is refused after
    the model loads, before any row runs, and nothing is written (exit 2). As a per_row
    column's fallback it stays a row matter: rows with their own spec run."""
    pytest.importorskip("xgrammar")
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"],
                             "structured_outputs": [None, json.dumps({"choice": ["red"]})]}),
                   path)
    out = tmp_path / "out"
    engine = {"kv_cache_blocks": 32, "device": "cpu"}
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_llama_dir, path, str(out), engine=engine,
                                sampling={"max_new_tokens": 4, "structured_outputs": spec}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not any(p.suffix == ".parquet" for p in out.rglob("*")) if out.exists() else True
    result = run_job(jobkit.make_job(
        tiny_llama_dir, path, str(out), engine=engine,
        sampling={"max_new_tokens": 4, "structured_outputs": spec,
                  "per_row": ["structured_outputs"]}))
    rows = ds.dataset(str(out)).to_table().to_pylist()
    assert rows[0]["error"].startswith("structured_outputs.")   # the job's spec, this row's
    assert rows[1]["output_text"] == "red"
    assert (result.num_rows_ok, result.num_rows_error) == (1, 1)


def test_check_structured_outputs_asks_the_engine_only_for_a_job_wide_spec():
    """What the engine says (e.g. xgrammar missing) refuses the job; no spec, a per_row column
    or an engine without the check is not judged."""
    from types import SimpleNamespace

    from llmbatch.jobs.engine_limits import check_structured_outputs

    asked = []
    engine = SimpleNamespace(structured_outputs_error=lambda spec: asked.append(spec) or
                             "structured outputs need xgrammar (pip install xgrammar)")
    job_wide = SimpleNamespace(structured_outputs={"json_object": True}, per_row=[])
    with pytest.raises(InvalidJobError, match="^sampling.structured_outputs: structured "
                                              "outputs need xgrammar"):
        check_structured_outputs(engine, job_wide)
    assert asked == [{"json_object": True}]
    check_structured_outputs(engine, SimpleNamespace(structured_outputs=None, per_row=[]))
    check_structured_outputs(engine, SimpleNamespace(structured_outputs={"json_object": True},
                                                     per_row=["structured_outputs"]))
    check_structured_outputs(object(), job_wide)
    assert len(asked) == 1
