"""A table in memory (a pandas DataFrame, a pyarrow Table, a `datasets` Dataset) given where a
job takes a path is refused in one line saying to write it to a file. A DataFrame as input.path
was iterated like a list (its column names) and read 'input.path: prompt does not exist'; a
pyarrow Table or a Dataset put its whole printed form into the message."""

import pandas as pd
import pyarrow as pa
import pytest

from llmbatch.api import InvalidJobError, load, run_job


def _job(tmp_path, **input_section):
    return {"model": {"path": str(tmp_path)}, "input": input_section,
            "output": {"path": str(tmp_path / "out")}}


@pytest.mark.parametrize("table, kind", [
    (pd.DataFrame({"prompt": ["a", "b"]}), "pandas DataFrame"),
    (pa.table({"prompt": ["a", "b"]}), "pyarrow Table"),
])
def test_a_table_as_input_path_is_refused(tmp_path, table, kind):
    with pytest.raises(InvalidJobError) as info:
        load(_job(tmp_path, path=table))
    assert info.value.exit_code == 2
    assert info.value.message == (
        f"input.path: got a {kind} in memory; llmbatch reads its input from files: write it "
        f"to Parquet (e.g. df.to_parquet('prompts.parquet')) and name that file")


def test_a_dataset_as_input_dataset_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"prompt": ["a"]})
    with pytest.raises(InvalidJobError) as info:
        load(_job(tmp_path, dataset=table))
    assert info.value.message == (
        "input.dataset: got a datasets Dataset in memory; llmbatch reads its input from "
        "files: write it to Parquet (e.g. df.to_parquet('prompts.parquet')) and name that "
        "file")


def test_a_table_in_a_list_or_an_override_is_named_where_it_is(tmp_path):
    frame = pd.DataFrame({"prompt": ["a"]})
    with pytest.raises(InvalidJobError, match=r"^input\.path\[1\]: got a pandas DataFrame "):
        load(_job(tmp_path, path=["a.parquet", frame]))
    with pytest.raises(InvalidJobError, match=r"^input\.path: got a pandas DataFrame "):
        run_job(_job(tmp_path, path="a.parquet"), input={"path": frame})


def test_plain_lists_and_numpy_values_still_load(tmp_path):
    import numpy as np

    spec = load(_job(tmp_path, path=pd.Series(["a.parquet", "b.parquet"]).tolist()),
                sampling={"stop": np.array(["x"]), "max_new_tokens": np.int64(4)})
    assert spec.input.path == ["a.parquet", "b.parquet"]
    assert (spec.sampling.stop, spec.sampling.max_new_tokens) == (["x"], 4)
