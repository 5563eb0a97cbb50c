"""A per-row sampling column of a type its key cannot take is one job error at start (exit 2,
before the model loads), naming the column, its Arrow type and what is expected; it made every
row an error row (exit 3) after the model had run over the whole job. Values of an accepted type
that are out of range stay row errors (test_runner.test_per_row_overrides)."""

from decimal import Decimal

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.cli import main
from llmbatch.jobs.column_types import ACCEPTED, check_per_row_types
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.sampling_values import row_value
from llmbatch.jobs.sampling_section import PER_ROW_KEYS

NUMBER = "a number column (float or int)"
INTEGER = "an integer column (int, or float holding whole numbers)"


def _schema(key, kind):
    return pa.schema([("prompt", pa.string()), (key, kind)])


def _message(key, kind):
    with pytest.raises(InvalidInputError) as info:
        check_per_row_types(_schema(key, kind), [key])
    assert info.value.exit_code == 2
    return info.value.message


def test_every_per_row_key_has_its_column_types():
    assert sorted(ACCEPTED) == sorted(PER_ROW_KEYS)


@pytest.mark.parametrize("key, kind", [
    ("temperature", pa.float64()), ("temperature", pa.int64()), ("top_p", pa.float32()),
    ("top_p", pa.float16()), ("temperature", pa.dictionary(pa.int8(), pa.float64())),
    ("max_new_tokens", pa.int32()), ("max_new_tokens", pa.float64()),   # pandas: ints + nulls
    ("top_k", pa.int8()), ("seed", pa.uint64()), ("logprobs", pa.int64()),
    ("ignore_eos", pa.bool_()), ("stop", pa.string()), ("stop", pa.large_string()),
    ("stop", pa.dictionary(pa.int32(), pa.string())), ("stop", pa.list_(pa.string())),
    ("stop", pa.large_list(pa.large_string())), ("stop_token_ids", pa.list_(pa.int64())),
    ("stop_token_ids", pa.list_(pa.int32(), 2)), ("stop_token_ids", pa.list_(pa.null())),
    # All null: every row takes the job's value.
    ("temperature", pa.null()), ("stop", pa.null()), ("ignore_eos", pa.null()),
])
def test_accepted_column_types(key, kind):
    check_per_row_types(_schema(key, kind), [key])


@pytest.mark.parametrize("key, kind, expected", [
    ("temperature", pa.string(), NUMBER),
    ("temperature", pa.bool_(), NUMBER),             # the job section refuses true/false too
    ("top_p", pa.decimal128(3, 2), NUMBER),
    ("max_new_tokens", pa.bool_(), INTEGER),
    ("seed", pa.large_string(), INTEGER),
    ("logprobs", pa.list_(pa.int64()), INTEGER),
    ("ignore_eos", pa.int64(), "a bool column"),
    ("ignore_eos", pa.string(), "a bool column"),
    ("stop", pa.int64(), "a string column or a list of strings"),
    ("stop", pa.list_(pa.int64()), "a string column or a list of strings"),
    ("stop_token_ids", pa.int64(), "a list of integers (list<int64>)"),
    ("stop_token_ids", pa.list_(pa.float64()), "a list of integers (list<int64>)"),
    ("stop_token_ids", pa.list_(pa.bool_()), "a list of integers (list<int64>)"),
])
def test_refused_column_types(key, kind, expected):
    assert _message(key, kind) == (f"sampling.per_row: column {key!r} is {kind}; "
                                   f"expected {expected}")


@pytest.mark.parametrize("key, value", [("temperature", "0.7"), ("temperature", True),
                                         ("top_p", Decimal("0.5")), ("max_new_tokens", True),
                                         ("stop_token_ids", [1.0]), ("ignore_eos", 1)])
def test_refused_types_are_those_whose_values_every_row_refuses(key, value):
    # The schema check mirrors row_value: a refused column type is one none of whose values
    # a row could use.
    with pytest.raises(ValueError):
        row_value(key, value)


def _no_engine(config):
    raise AssertionError("the model was loaded for a job refused at start")


def test_string_temperature_column_is_refused_before_the_model_loads(tmp_path, tiny_tokenizer_dir,
                                                                     jobkit, fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "temperature": ["0.7", None]}), path)
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, path, str(out),
                                sampling={"per_row": ["temperature"]}), engine_factory=_no_engine)
    assert info.value.message == ("sampling.per_row: column 'temperature' is string; expected "
                                  "a number column (float or int)")
    assert not out.exists()


def test_cli_exit_2_one_line(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, capsys,
                             monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "max_new_tokens": [True, False]}),
                   "in.parquet")
    job = jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out",
                          sampling={"per_row": ["max_new_tokens"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == ("llmbatch: error: sampling.per_row: column 'max_new_tokens' is bool; "
                   f"expected {INTEGER}\n")
    assert not (tmp_path / "out").exists()


def test_datasets_input_is_checked_alike(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a b", "c d"], "stop_token_ids": ["1", "2"]}) \
        .save_to_disk(str(tmp_path / "d"))
    job = jobkit.make_job(tiny_tokenizer_dir, None, str(tmp_path / "out"),
                          sampling={"per_row": ["stop_token_ids"]})
    job["input"] = {"dataset": str(tmp_path / "d")}
    with pytest.raises(InvalidInputError) as info:
        run_job(job, engine_factory=_no_engine)
    assert info.value.message == ("sampling.per_row: column 'stop_token_ids' is string; "
                                  "expected a list of integers (list<int64>)")


def test_null_and_whole_float_columns_still_run(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env):
    # A column of nulls only (Arrow type null) and a float max_new_tokens column with nulls
    # (what pandas writes for ints with gaps) are valid: null means the job's value.
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "temperature": pa.nulls(2),
                             "max_new_tokens": [3.0, None]}), path)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, path, out,
                                     sampling={"per_row": ["temperature", "max_new_tokens"],
                                               "ignore_eos": True}))
    assert result.exit_code == 0
    rows = ds.dataset(out).to_table().to_pylist()
    assert [r["num_output_tokens"] for r in rows] == [3, 8]
