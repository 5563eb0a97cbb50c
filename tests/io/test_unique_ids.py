"""input.id_column must give each input row its own id (io/unique_ids.py): a repeated id is
refused in one line before the model loads (exit 2), naming the first row that repeats an
earlier row's id, for in-memory tables, multi-file Parquet (a repeat across files) and every
shard of a sharded job (a repeat across shards). Null ids stay row errors; types Arrow cannot
hash are not checked. Fake engine for the job runs."""

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from llmbatch.cli import main
from llmbatch.io.reader import ArrowDatasetSource, TableSource
from llmbatch.io.unique_ids import check_unique_ids
from llmbatch.jobs.errors import InvalidInputError


def _check(column, batch_size=3) -> str | None:
    """The refusal's message, or None when the ids pass."""
    try:
        check_unique_ids(TableSource(pa.table({"id": column}), "t"), "id", batch_size)
    except InvalidInputError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("column", [
    [1, 2, 3, 4],
    ["a", "b", "c"],
    [7, None, None, 8],                       # nulls are each their own row error
    pa.array([], pa.int64()),
    pa.array([[1], [1]]),                     # lists: not hashable by Arrow, not checked
    [1.0, float("nan"), 2.0],
], ids=["ints", "strings", "nulls", "empty", "lists", "one-nan"])
def test_unique_ids_pass(column):
    assert _check(column) is None


def test_the_first_row_that_repeats_an_earlier_id_is_named():
    # Row 3 repeats row 1's id (2); row 4 repeats row 0's (5), row 7 row 6's: 3 repeats in all.
    assert _check([5, 2, 3, 2, 5, 7, 8, 8]) == (
        "input.id_column 'id' is not unique: row 3 repeats row 1's id 2 (3 rows repeat an "
        "earlier row's id); an id joins each output row back to its input row, so deduplicate "
        "the input or drop input.id_column to use row indices")


@pytest.mark.parametrize("column, expected", [
    (["a", None, "b", None, "a"], "row 4 repeats row 0's id 'a' (1 row repeats"),
    # Dictionary-encoded, each chunk with its own dictionary (Parquet reads strings so).
    (pa.chunked_array([pa.array(["x", "y"]).dictionary_encode(),
                       pa.array(["z", "x"]).dictionary_encode()]),
     "row 3 repeats row 0's id 'x' (1 row repeats"),
    ([1.0, float("nan"), float("nan")], "row 2 repeats row 1's id nan (1 row repeats"),
    (["w" * 100, "w" * 100], "row 1 repeats row 0's id '" + "w" * 56 + "... (1 row repeats"),
], ids=["nulls-between", "dictionary", "nan", "long-id-cut"])
def test_repeats_refused(column, expected):
    message = _check(column)
    assert message is not None and expected in message, message


def test_a_repeat_across_parquet_files(tmp_path):
    (tmp_path / "inp").mkdir()
    pd.DataFrame({"id": ["k0", "k1"]}).to_parquet(tmp_path / "inp" / "a.parquet")
    pd.DataFrame({"id": ["k2", "k1"]}).to_parquet(tmp_path / "inp" / "b.parquet")
    source = ArrowDatasetSource(ds.dataset(str(tmp_path / "inp")), "inp")
    with pytest.raises(InvalidInputError, match=r"row 3 repeats row 1's id 'k1'"):
        check_unique_ids(source, "id", batch_size=1)


def _job(tmp_path, jobkit, tokenizer_dir, ids, **shard) -> None:
    pd.DataFrame({"prompt": [f"p {i}" for i in range(len(ids))], "key": ids}).to_parquet(
        tmp_path / "inp.parquet")
    job = jobkit.make_job(tokenizer_dir, "inp.parquet", "out", input={"id_column": "key"},
                          **({"shard": shard} if shard else {}))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))


def test_a_job_with_repeated_ids_exits_2_before_writing(tmp_path, tiny_tokenizer_dir, jobkit,
                                                        fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _job(tmp_path, jobkit, tiny_tokenizer_dir, ["a", "b", "a"])
    assert main(["run", "job.yaml", "--progress", "none"]) == 2
    assert capsys.readouterr().err == (
        "llmbatch: error: input.id_column 'key' is not unique: row 2 repeats row 0's id 'a' "
        "(1 row repeats an earlier row's id); an id joins each output row back to its input "
        "row, so deduplicate the input or drop input.id_column to use row indices\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("index", [0, 1])
def test_every_shard_refuses_a_repeat_across_shards(tmp_path, tiny_tokenizer_dir, jobkit,
                                                    fake_engine_env, monkeypatch, capsys, index):
    # Shard 0 holds rows [0, 2), shard 1 rows [2, 4): the repeat spans both, and each sees it.
    monkeypatch.chdir(tmp_path)
    _job(tmp_path, jobkit, tiny_tokenizer_dir, ["a", "b", "c", "b"], index=index, count=2)
    assert main(["run", "job.yaml", "--progress", "none"]) == 2
    assert "row 3 repeats row 1's id 'b'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unique_ids_run(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch,
                        capsys):
    monkeypatch.chdir(tmp_path)
    _job(tmp_path, jobkit, tiny_tokenizer_dir, ["a", "b", "c"])
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    capsys.readouterr()
