"""Part names carry the sequence number padded to 5 digits, and readers of the folder take the
files in name order: part-00000-100000 read before part-00000-99999, out of input order. A job
that would write more than MAX_PARTS_PER_SHARD parts in a shard is refused before the model
loads (the limit is lowered here so a test can reach it)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.jobs import path_checks
from llmbatch.jobs.errors import EXIT_INVALID, InvalidJobError


def test_name_order_breaks_past_five_digits(tmp_path):
    """Why the limit exists: pyarrow reads a 6-digit sequence number first."""
    for name, value in [("part-00000-99999.parquet", 1), ("part-00000-100000.parquet", 2)]:
        pq.write_table(pa.table({"x": [value]}), tmp_path / name)
    assert ds.dataset(str(tmp_path)).to_table().column("x").to_pylist() == [2, 1]


def test_too_many_parts_are_refused_up_front(tmp_path, tiny_tokenizer_dir, jobkit,
                                              fake_engine_env, monkeypatch):
    monkeypatch.setattr(path_checks, "MAX_PARTS_PER_SHARD", 3)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 10)
    out = tmp_path / "out"
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(out), output={"rows_per_part": 3})
    with pytest.raises(InvalidJobError) as info:
        run_job(job)
    assert info.value.exit_code == EXIT_INVALID
    assert info.value.message == ("output.rows_per_part: 3 would split this shard into 4 "
                                  "parts, more than 3 (part names sort out of input order "
                                  "past that); raise output.rows_per_part or shard.count")
    assert not out.exists()
    job["output"]["rows_per_part"] = 4     # 3 parts fit
    assert run_job(job).num_rows == 10
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-00000-{s:05d}.parquet"
                                                          for s in range(3)]
