"""`llmbatch merge` of parts whose kept-column types differ. A folder resumed across the version
that merged multi-file input schemas has a kept column int32 in its older parts and int64 in
the newer ones; the merge died as 'internal error: ValueError: Table schema does not match
schema used to create file' (exit 1). Types that unify are merged; others are one line."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.cli import main


@pytest.fixture
def out_dir(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch):
    """A finished job of 9 rows in three parts, keeping an int64 column `k`."""
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"prompt": [f"p {i}" for i in range(9)],
                             "k": pa.array(range(100, 109), pa.int64())}), "in.parquet")
    run_job(jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out",
                            input={"keep_columns": ["k"]}, output={"rows_per_part": 3}))
    return "out"


def _retype_first_part(out_dir: str, kind: pa.DataType) -> None:
    """Rewrite the first committed part with `k` as `kind`, its metadata kept."""
    path = os.path.join(out_dir, sorted(n for n in os.listdir(out_dir)
                                        if n.startswith("part-"))[0])
    table = pq.read_table(path)
    i = table.schema.get_field_index("k")
    column = table.column(i).cast(kind) if kind != pa.string() else \
        pa.array([str(v) for v in table.column(i).to_pylist()])
    table = table.set_column(i, pa.field("k", kind), column)
    pq.write_table(table, path)


def test_parts_with_an_int32_and_an_int64_column_merge_as_int64(out_dir, capsys):
    _retype_first_part(out_dir, pa.int32())
    code = main(["merge", out_dir, "-o", "all.parquet"])
    assert code == 0, capsys.readouterr().err
    merged = pq.read_table("all.parquet")
    assert merged.schema.field("k").type == pa.int64()
    assert merged.column("k").to_pylist() == list(range(100, 109))
    assert merged.column("id").to_pylist() == list(range(9))


def test_parts_whose_types_do_not_unify_are_one_line_exit_2(out_dir, capsys, tmp_path):
    _retype_first_part(out_dir, pa.string())
    code = main(["merge", out_dir, "-o", "all.parquet"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: the committed parts of {out_dir} disagree on their "
                   f"columns (Unable to merge: Field k has incompatible types: string vs int64); "
                   f"rerun the job with output.mode: overwrite\n")
    assert not os.path.exists("all.parquet")
