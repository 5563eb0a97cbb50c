"""Per-row repetition_penalty, presence_penalty, frequency_penalty and min_p columns, as per-row
temperature and top_p: numbers (int or float) coerced to float, a column no row could use
refused when the job starts, and a value out of range that row's error (SamplingParams' own
message), not the job's."""

import math

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from llmbatch import run_job
from llmbatch.jobs.column_types import check_per_row_types
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.sampling_values import row_value
from llmbatch.jobs.sampling_section import PER_ROW_KEYS
from tests.jobs.test_review_findings_jobs import RecordingEngine

KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")
BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def test_the_keys_may_be_read_per_row():
    assert set(KEYS) <= set(PER_ROW_KEYS)
    assert load_job({**BASE, "sampling": {"per_row": list(KEYS)}}).sampling.per_row == \
        list(KEYS)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.5, 0.5), (-1.0, -1.0)])
def test_a_row_value_is_a_float(key, value, expected):
    out = row_value(key, value)
    assert out == expected and type(out) is float


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["0.7", True, math.nan, math.inf, [1.0]])
def test_a_row_value_that_is_no_finite_number_is_refused(key, value):
    with pytest.raises(ValueError) as info:
        row_value(key, value)
    assert str(info.value) == f"{key} must be a finite number, got {value!r}"


@pytest.mark.parametrize("key", KEYS)
def test_number_columns_are_accepted_and_text_refused(key):
    for kind in (pa.float64(), pa.float32(), pa.int64(), pa.null()):
        check_per_row_types(pa.schema([("prompt", pa.string()), (key, kind)]), [key])
    with pytest.raises(InvalidInputError) as info:
        check_per_row_types(pa.schema([("prompt", pa.string()), (key, pa.string())]), [key])
    assert info.value.message == (f"sampling.per_row: column {key!r} is string; expected a "
                                  f"number column (float or int)")


def test_a_row_overrides_the_job_and_null_keeps_it():
    spec = load_job({**BASE, "sampling": {"repetition_penalty": 1.1, "min_p": 0.1,
                                          "per_row": ["repetition_penalty", "min_p"]}})
    params = spec.sampling_params({"repetition_penalty": 2, "min_p": None})
    assert (params.repetition_penalty, params.min_p) == (2.0, 0.1)


@pytest.mark.parametrize("row, message", [
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1.0 is off) and a normal "
                                  "float32 (1.2e-38 to 3.4e38), got 0.0"),
    # 0 and inf in the sampler's float32: masked logits became NaN and argmax picked them
    ({"repetition_penalty": 1e-50}, "repetition_penalty must be > 0 (1.0 is off) and a normal "
                                    "float32 (1.2e-38 to 3.4e38), got 1e-50"),
    ({"repetition_penalty": 1e39}, "repetition_penalty must be > 0 (1.0 is off) and a normal "
                                   "float32 (1.2e-38 to 3.4e38), got 1e+39"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2] (0.0 is off), got 2.5"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2] (0.0 is off), got -3.0"),
    ({"min_p": 1.5}, "min_p must be in [0, 1] (0.0 is off), got 1.5"),
])
def test_a_row_value_out_of_range_raises_for_that_row(row, message):
    spec = load_job({**BASE, "sampling": {"per_row": list(KEYS)}})
    with pytest.raises(ValueError) as info:
        spec.sampling_params(row)
    assert str(info.value) == message


def test_a_job_with_per_row_columns_runs_and_a_bad_row_is_its_error(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    path = jobkit.write_prompts(
        str(tmp_path / "in.parquet"), 4, repetition_penalty=[1.3, None, 0.0, 1.0],
        presence_penalty=[0.5, None, 0.0, -2.0], frequency_penalty=[None, 1, 0, 3.0],
        min_p=[0.05, None, 0.0, 0.1])
    out = str(tmp_path / "out")
    RecordingEngine.seen = {}
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, path, out, sampling={
        "min_p": 0.2, "frequency_penalty": -0.5, "per_row": list(KEYS)}),
        engine_factory=RecordingEngine)
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["error"] for r in rows] == [
        None, None,
        "invalid per-row sampling value: repetition_penalty must be > 0 (1.0 is off) and a "
        "normal float32 (1.2e-38 to 3.4e38), got 0.0",
        "invalid per-row sampling value: frequency_penalty must be in [-2, 2] (0.0 is off), "
        "got 3.0"]
    assert result.exit_code == 3
    seen = {i: tuple(getattr(p, k) for k in KEYS) for i, p in RecordingEngine.seen.items()}
    assert seen == {0: (1.3, 0.5, -0.5, 0.05), 1: (1.0, 0.0, 1.0, 0.2)}
