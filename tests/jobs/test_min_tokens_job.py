"""sampling.min_tokens (vLLM's) in the job layer: an int >= 0, default 0, at most max_new_tokens
(a one-line job error, unless max_new_tokens is read per row: then a row whose max_new_tokens is
below it is that row's error, SamplingParams' own message); readable per row as the other int
keys; known to the unknown-key hint; passed to SamplingParams; and at 0 left out of the config
hash, so every existing job keeps its hash (test_top_k_hash.py pins them)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from llmbatch import run_job
from llmbatch.cli import main
from llmbatch.io.config_diff import describe_differences
from llmbatch.jobs.column_types import check_per_row_types
from llmbatch.jobs.errors import InvalidInputError, ResumeError
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.sampling_values import row_value
from llmbatch.jobs.sampling_section import PER_ROW_KEYS
from tests.jobs.test_penalty_hash import half_done_folder
from tests.jobs.test_penalty_section import error_of, job
from tests.jobs.test_review_findings_jobs import RecordingEngine
from tests.jobs.test_top_k_hash import HASH_TOP_K_40, HASH_TOP_K_OFF
from tests.jobs.test_top_k_hash import job as hash_job

# load_job(hash_job(sampling={"min_tokens": 3})).config_hash(1), at this change.
HASH_MIN_TOKENS_3 = "2df5efa92ee4fc25"   # output rules v4 (v3: cb4902502926cbec)


# -- the section -----------------------------------------------------------------------------
def test_default_is_0_in_the_section_and_in_sampling_params():
    spec = load_job(job())
    assert spec.sampling.min_tokens == 0
    assert spec.sampling_params().min_tokens == 0


@pytest.mark.parametrize("sampling, expected", [
    ({"min_tokens": 0}, 0), ({"min_tokens": 5}, 5), ({"min_tokens": 5.0}, 5),
    ({"min_tokens": 256}, 256),                         # max_new_tokens' default: allowed
    ({"min_tokens": 8, "max_new_tokens": 8}, 8),
])
def test_values_reach_sampling_params(sampling, expected):
    spec = load_job(job(**sampling))
    params = spec.sampling_params(row_seed_offset=3)
    assert (spec.sampling.min_tokens, params.min_tokens) == (expected, expected)
    assert type(params.min_tokens) is int


@pytest.mark.parametrize("sampling, message", [
    ({"min_tokens": -1}, "sampling.min_tokens: must be greater than or equal to 0 (got -1)"),
    ({"min_tokens": 1.5}, "sampling.min_tokens: expected an integer, got 1.5"),
    ({"min_tokens": "three"}, "sampling.min_tokens: expected an integer, got 'three'"),
    ({"min_tokens": True}, "sampling.min_tokens: expected an integer, got True"),
    ({"min_tokens": None}, "sampling.min_tokens: expected an integer, got None"),
    ({"min_tokens": 257},
     "sampling.min_tokens: must be at most sampling.max_new_tokens, 256 (got 257)"),
    ({"min_tokens": 9, "max_new_tokens": 8},
     "sampling.min_tokens: must be at most sampling.max_new_tokens, 8 (got 9)"),
    # A per-row min_tokens column: the job's value is the null cells' value, still checked.
    ({"min_tokens": 9, "max_new_tokens": 8, "per_row": ["min_tokens"]},
     "sampling.min_tokens: must be at most sampling.max_new_tokens, 8 (got 9)"),
])
def test_bad_values_are_one_line_errors(sampling, message):
    assert error_of(job(**sampling)) == message


def test_a_per_row_max_new_tokens_leaves_the_check_to_each_row():
    spec = load_job(job(min_tokens=9, max_new_tokens=8, per_row=["max_new_tokens"]))
    assert spec.sampling_params({"max_new_tokens": 16}).min_tokens == 9
    with pytest.raises(ValueError) as info:
        spec.sampling_params({"max_new_tokens": None})
    assert str(info.value) == "min_tokens must be in [0, max_new_tokens=8], got 9"


@pytest.mark.parametrize("key, meant", [("min_token", "min_tokens"), ("mintokens", "min_tokens")])
def test_misspelled_keys_are_told_min_tokens(key, meant):
    assert error_of(job(**{key: 1})) == \
        f"unknown key '{key}' in section 'sampling' (did you mean '{meant}'?)"


def test_set_values():
    spec = load_job(job(), ["sampling.min_tokens=4"])
    assert spec.sampling_params().min_tokens == 4
    spec = load_job(job(min_tokens=2), ["sampling={max_new_tokens: 2}"])   # merged
    assert (spec.sampling.min_tokens, spec.sampling.max_new_tokens) == (2, 2)
    assert error_of(job(max_new_tokens=4), ["sampling.min_tokens=5"]) == \
        "sampling.min_tokens: must be at most sampling.max_new_tokens, 4 (got 5)"
    assert error_of(job(min_tokens=4), ["sampling.max_new_tokens=3"]) == \
        "sampling.min_tokens: must be at most sampling.max_new_tokens, 3 (got 4)"


def test_validate_shows_it_and_refuses_a_bad_one(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(max_new_tokens=16)))
    assert main(["validate", str(path), "--set", "sampling.min_tokens=3"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and yaml.safe_load(out)["sampling"]["min_tokens"] == 3
    assert main(["validate", str(path), "--set", "sampling.min_tokens=17"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "llmbatch: error: sampling.min_tokens: must be at most "
                              "sampling.max_new_tokens, 16 (got 17)\n")


# -- per row ---------------------------------------------------------------------------------
def test_min_tokens_may_be_read_per_row():
    assert "min_tokens" in PER_ROW_KEYS
    assert load_job(job(per_row=["min_tokens"])).sampling.per_row == ["min_tokens"]


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), (0, 0)])
def test_a_row_value_is_an_int(value, expected):
    out = row_value("min_tokens", value)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [1.5, "3", True, [3]])
def test_a_row_value_that_is_no_integer_is_refused(value):
    with pytest.raises(ValueError) as info:
        row_value("min_tokens", value)
    assert str(info.value) == f"min_tokens must be an integer, got {value!r}"


def test_int_columns_are_accepted_and_text_refused():
    for kind in (pa.int64(), pa.int32(), pa.float64(), pa.null()):
        check_per_row_types(pa.schema([("prompt", pa.string()), ("min_tokens", kind)]),
                            ["min_tokens"])
    with pytest.raises(InvalidInputError) as info:
        check_per_row_types(pa.schema([("prompt", pa.string()), ("min_tokens", pa.string())]),
                            ["min_tokens"])
    assert info.value.message == ("sampling.per_row: column 'min_tokens' is string; expected an "
                                  "integer column (int, or float holding whole numbers)")


@pytest.mark.parametrize("row, message", [
    ({"min_tokens": -1}, "min_tokens must be in [0, max_new_tokens=8], got -1"),
    ({"min_tokens": 9}, "min_tokens must be in [0, max_new_tokens=8], got 9"),
    ({"max_new_tokens": 2}, "min_tokens must be in [0, max_new_tokens=2], got 4"),
])
def test_a_row_value_out_of_range_raises_for_that_row(row, message):
    spec = load_job(job(min_tokens=4, max_new_tokens=8,
                        per_row=["min_tokens", "max_new_tokens"]))
    with pytest.raises(ValueError) as info:
        spec.sampling_params(row)
    assert str(info.value) == message


def test_a_job_with_a_min_tokens_column_runs_and_a_bad_row_is_its_error(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    path = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4,
                                min_tokens=[3, None, 9, 2], max_new_tokens=[None, None, 8, 1])
    out = str(tmp_path / "out")
    RecordingEngine.seen = {}
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, path, out, sampling={
        "max_new_tokens": 8, "min_tokens": 1, "per_row": ["min_tokens", "max_new_tokens"]}),
        engine_factory=RecordingEngine)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["error"] for r in rows] == [
        None, None,
        "invalid per-row sampling value: min_tokens must be in [0, max_new_tokens=8], got 9",
        "invalid per-row sampling value: min_tokens must be in [0, max_new_tokens=1], got 2"]
    assert result.exit_code == 3
    seen = {i: (p.min_tokens, p.max_new_tokens) for i, p in RecordingEngine.seen.items()}
    assert seen == {0: (3, 8), 1: (1, 8)}


# -- the config hash -------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{}, {"min_tokens": 0}, {"min_tokens": 0.0}])
def test_min_tokens_0_keeps_the_pinned_hashes(sampling):
    spec = load_job(hash_job(sampling=sampling))
    assert spec.config_hash(1) == HASH_TOP_K_OFF
    assert "min_tokens" not in spec.hashed_settings(1)["sampling"]
    assert load_job(hash_job(sampling={**sampling, "top_k": 40})).config_hash(1) == \
        HASH_TOP_K_40


def test_min_tokens_0_by_set_keeps_the_pinned_hash():
    assert load_job(hash_job(), ["sampling.min_tokens=0"]).config_hash(1) == HASH_TOP_K_OFF


def test_min_tokens_3_changes_the_hash():
    spec = load_job(hash_job(sampling={"min_tokens": 3}))
    assert spec.hashed_settings(1)["sampling"]["min_tokens"] == 3
    assert spec.config_hash(1) == HASH_MIN_TOKENS_3
    assert HASH_MIN_TOKENS_3 not in (HASH_TOP_K_OFF, HASH_TOP_K_40)
    assert load_job(hash_job(sampling={"min_tokens": 1})).config_hash(1) not in \
        (HASH_TOP_K_OFF, HASH_MIN_TOKENS_3)


def test_a_difference_names_0_for_a_folder_that_does_not_record_it():
    assert describe_differences({"sampling": {"seed": 0}},
                                {"sampling": {"seed": 0, "min_tokens": 3}}) == \
        "sampling.min_tokens 0 -> 3"
    assert describe_differences({"sampling": {"seed": 0, "min_tokens": 0}},
                                {"sampling": {"seed": 0}}) == ""


def test_a_folder_resumes_with_min_tokens_0_and_refuses_3_naming_it(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    make, _, _, first = half_done_folder(tmp_path, tiny_tokenizer_dir, jobkit)
    again = run_job(make(min_tokens=0))
    assert (again.config_hash, again.num_rows_skipped) == (first.config_hash, 10)
    with pytest.raises(ResumeError, match=r"sampling.min_tokens 0 -> 3"):
        run_job(make(min_tokens=3))
