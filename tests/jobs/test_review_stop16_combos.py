"""Review of this session's job-file keys in combination (sampling.n, prompt_logprobs,
structured_outputs, allowed_token_ids / logit_bias, include_stop_str_in_output /
skip_special_tokens, truncate_prompt_tokens, model.continue_final_message, model.lora).

The first four tests failed on the code reviewed (each names the finding; fixed since); the
rest cover combinations no other test runs."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch import run_job
from llmbatch.io.config_diff import describe_differences
from llmbatch.jobs.loader import load_job
from tests.jobs.test_top_k_hash import job

LONG = " ".join(["the cat sat on the mat"] * 8)


# -- findings (fail before a fix) ---------------------------------------------------------------

def test_set_takes_a_structured_outputs_mapping():
    # README: any key can be overridden with --set, a value read as YAML. The annotation is
    # Optional[dict], which loader._takes_mapping does not recognise (only dict / dict[..]),
    # so the mapping is kept as its text: "sampling.structured_outputs: expected a mapping,
    # got '{choice: [a, b]}'" (exit 2).
    spec = load_job(job(), ["sampling.structured_outputs={choice: [a, b]}"])
    assert spec.sampling.structured_outputs == {"choice": ["a", "b"]}


def test_set_takes_a_logit_bias_mapping():
    # Same cause: Optional[dict[Int, Float]]; "sampling.logit_bias: expected a mapping, got
    # '{5: 2}'".
    spec = load_job(job(), ["sampling.logit_bias={5: 2}"])
    assert spec.sampling.logit_bias == {5: 2.0}


def test_a_refused_resume_names_the_new_mapping_keys_whole_with_their_neutral_value():
    # config_diff.LEFT_OUT_AT says a side that does not record a key had its neutral value and
    # the line says so ("1.0 -> 1.2", not "(unset) -> 1.2"). The mapping-valued keys are
    # flattened into sub-keys instead ("sampling.logit_bias.5 (unset) -> 2.0",
    # "sampling.structured_outputs.choice (unset) -> [...]"), and model.lora /
    # model.continue_final_message (left out by exclude_if, not in LEFT_OUT_AT) read
    # "(unset) -> ...".
    base = load_job(job()).hashed_settings(1)

    def diff(**sections):
        return describe_differences(base, load_job(job(**sections)).hashed_settings(1))

    assert diff(sampling={"logit_bias": {5: 2}}) == 'sampling.logit_bias null -> {"5": 2.0}'
    assert diff(sampling={"structured_outputs": {"choice": ["a", "b"]}}) == \
        'sampling.structured_outputs null -> {"choice": ["a", "b"]}'
    assert diff(model={"path": "m", "lora": "adapter"}) == "model.lora null -> adapter"
    msgs = {"path": "in.parquet", "messages_column": "messages"}
    base = load_job(job(input=msgs)).hashed_settings(1)
    assert describe_differences(base, load_job(job(
        input=msgs, model={"path": "m", "continue_final_message": True})).hashed_settings(1)) \
        == "model.continue_final_message false -> true"


def test_n_samples_with_prompt_logprobs_score_the_prompt_once(tmp_path, tiny_llama_dir, jobkit,
                                                              monkeypatch):
    # README (sampling.n): the samples after the first read the prompt from the prefix cache.
    # With prompt_logprobs every sample's request scores the prompt (no cache hit), so n
    # samples cost n full prefills for n identical columns: all three samples of a 70-token
    # prompt report num_cached_prompt_tokens 0. Sample 0's scores are the row's; samples
    # j > 0 need not score again (RowSamples.sample_params could drop prompt_logprobs and the
    # row copy sample 0's column).
    pytest.importorskip("llmbatch.runtime.engine")
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": [LONG]}), inp)
    out = str(tmp_path / "out")
    run_job(jobkit.make_job(tiny_llama_dir, inp, out,
                            engine={"kv_cache_blocks": 64, "device": "cpu"},
                            sampling={"max_new_tokens": 2, "temperature": 1.0, "n": 3,
                                      "prompt_logprobs": 1}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["sample_index"] for r in rows] == [0, 1, 2]
    assert [len(r["prompt_logprobs"]) for r in rows] == [r["num_prompt_tokens"] for r in rows]
    assert rows[1]["prompt_logprobs"] == rows[0]["prompt_logprobs"] == rows[2]["prompt_logprobs"]
    full = (rows[0]["num_prompt_tokens"] - 1) // 16 * 16
    assert [r["num_cached_prompt_tokens"] for r in rows] == [0, full, full]


# -- gap tests (pass) ---------------------------------------------------------------------------

def test_validate_output_reloads_to_the_same_hash_with_every_new_key():
    # What `llmbatch validate` prints (model_dump(mode="json") as YAML): logit_bias's int keys
    # come out as '5' strings and structured_outputs's schema as JSON text; read back, they
    # are the same settings and the same config hash. Each key moves the hash off the default.
    sampling = {"structured_outputs": {"json": {"type": "object", "properties": {
                    "b": {"type": "string"}, "a": {"type": "integer"}}}},
                "logit_bias": {5: 2, 3: -1.5}, "prompt_logprobs": 0,
                "include_stop_str_in_output": True, "skip_special_tokens": False,
                "truncate_prompt_tokens": -1, "n": 2, "temperature": 0.5}
    spec = load_job(job(sampling=sampling))
    shown = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    assert "  logit_bias:\n    '5': 2.0\n    '3': -1.5\n" in shown
    again = load_job(yaml.safe_load(shown))
    assert again.sampling.logit_bias == {5: 2.0, 3: -1.5}
    assert again.sampling.structured_outputs == {"json": '{"type": "object", "properties": '
                                                 '{"b": {"type": "string"}, "a": {"type": '
                                                 '"integer"}}}'}
    assert again.config_hash(1) == spec.config_hash(1)
    default = load_job(job(sampling={"temperature": 0.5})).config_hash(1)
    hashes = {default}
    for key, value in sampling.items():
        if key != "temperature":
            hashes.add(load_job(job(sampling={"temperature": 0.5, key: value})).config_hash(1))
    hashes.add(load_job(job(sampling={"temperature": 0.5, "allowed_token_ids": [3]}))
               .config_hash(1))
    hashes.add(load_job(job(sampling={"temperature": 0.5},
                            model={"path": "m", "lora": "a"})).config_hash(1))
    assert len(hashes) == 10


def test_n_truncation_prompt_logprobs_and_per_row_nulls_on_the_fake_engine(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    # n = 2 with prompt_logprobs and truncation: each sample's column has num_prompt_tokens
    # (the kept length) entries, first null; per-row null cells take the job's value; a
    # row's error (empty prompt, a bad structured_outputs cell) is repeated per sample with a
    # null column; then merge writes every output row with both columns.
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({
        "prompt": [LONG, "", "hello world", "the dog"],
        "structured_outputs": [None, '{"choice": ["a"]}', '{"bogus": 1}', '{"regex": "[ab]"}'],
        "allowed_token_ids": [None, [1, 2], None, None],
        "include_stop_str_in_output": [None, True, None, False],
        "prompt_logprobs": [None, 1, None, 0]}), inp)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_tokenizer_dir, inp, out,
        sampling={"max_new_tokens": 4, "n": 2, "temperature": 1.0, "prompt_logprobs": 2,
                  "truncate_prompt_tokens": 5, "structured_outputs": {"choice": ["x", "y"]},
                  "per_row": ["structured_outputs", "allowed_token_ids",
                              "include_stop_str_in_output", "prompt_logprobs"]}))
    assert (result.num_rows_ok, result.num_rows_error, result.exit_code) == (2, 2, 3)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == \
        [(i, j) for i in range(4) for j in range(2)]
    assert [r["finish_reason"] == "error" for r in rows] == \
        [False, False, True, True, True, True, False, False]
    assert [r["num_prompt_tokens"] for r in rows] == [5, 5, 0, 0, 5, 5, 5, 5]
    assert rows[4]["error"] == rows[5]["error"] == (
        "invalid per-row sampling value: structured_outputs must be a mapping with exactly one "
        "of json, json_object, regex, choice, grammar, got {'bogus': 1}")
    for r in rows:
        if r["finish_reason"] == "error":
            assert r["prompt_logprobs"] is None
        else:
            column = r["prompt_logprobs"]
            assert len(column) == 5 and column[0] is None
            want = 2 if r["id"] == 0 else 0        # null cell: the job's 2; row 3's own 0
            assert [len(e["top"]) for e in column[1:]] == [want] * 4
    import llmbatch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    dest = str(tmp_path / "all.parquet")
    merged = subprocess.run([sys.executable, "-m", "llmbatch.cli", "merge", out, "-o", dest],
                            env=dict(os.environ, PYTHONPATH=repo), capture_output=True,
                            text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == f"merged 1 part, 4 rows (8 output rows) -> {dest}"
    table = pq.read_table(dest)
    assert table.column_names[1] == "sample_index"
    assert table.select(["id", "sample_index", "prompt_logprobs"]).equals(
        ds.dataset(out).to_table().select(["id", "sample_index", "prompt_logprobs"]))


def test_truncation_with_prompt_logprobs_on_the_runtime_engine(tmp_path, tiny_llama_dir, jobkit,
                                                               monkeypatch):
    # The column scores the kept tokens only: num_prompt_tokens == k == its length, first
    # null (the first kept token has no context), and no cache hit for a scored row.
    pytest.importorskip("llmbatch.runtime.engine")
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": [LONG, LONG + " dog"]}), inp)
    out = str(tmp_path / "out")
    run_job(jobkit.make_job(tiny_llama_dir, inp, out,
                            engine={"kv_cache_blocks": 64, "device": "cpu"},
                            sampling={"max_new_tokens": 1, "prompt_logprobs": 1,
                                      "truncate_prompt_tokens": 20}))
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["num_prompt_tokens"] for r in rows] == [20, 20]
    assert [len(r["prompt_logprobs"]) for r in rows] == [20, 20]
    assert [r["prompt_logprobs"][0] for r in rows] == [None, None]
    assert [r["num_cached_prompt_tokens"] for r in rows] == [0, 0]
