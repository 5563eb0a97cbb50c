"""`llmbatch stats` on a folder whose _stats/ holds a damaged or foreign stats-*.parquet was a
traceback (exit 1); it is one line naming the file (exit 2). A stats file of an older llmbatch,
lacking a newer column, still reads (the column as nulls)."""

import pyarrow.parquet as pq

from llmbatch.cli import main
from llmbatch.jobs.stats import STATS_SCHEMA


def test_a_damaged_stats_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "_stats").mkdir(parents=True)
    (tmp_path / "out" / "_stats" / "stats-00000-000.parquet").write_text("garbage")
    assert main(["stats", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbatch: error: out/_stats/stats-00000-000.parquet: not a stats "
                          "file llmbatch can read (ArrowInvalid: "), err
    assert err.count("\n") == 1


def test_an_older_stats_file_lacking_a_column_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "_stats").mkdir(parents=True)
    row = {name: None for name in STATS_SCHEMA.names}
    row.update(shard_index=0, shard_count=1)
    table = STATS_SCHEMA.empty_table().from_pylist([row], schema=STATS_SCHEMA)
    pq.write_table(table.drop_columns([STATS_SCHEMA.names[-1]]),
                   tmp_path / "out" / "_stats" / "stats-00000-000.parquet")
    assert main(["stats", "out"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{STATS_SCHEMA.names[-1]}=None" in out


def test_stats_are_read_in_shard_and_run_order_past_five_digits(tmp_path):
    """Files were sorted by name, so shard 100000 came before shard 99999 and run 1000 before
    run 999; a file not named like ours is not read."""
    from llmbatch.jobs.stats import read_stats, write_stats
    keys = [(100000, 0), (99999, 1000), (99999, 999), (5, 0)]
    for shard, run in keys:
        row = {name: None for name in STATS_SCHEMA.names}
        row.update(shard_index=shard, shard_count=200000, run=run)
        write_stats(str(tmp_path), row)
    (tmp_path / "_stats" / "stats-notes.parquet").write_text("not ours")
    got = [(r["shard_index"], r["run"]) for r in read_stats(str(tmp_path)).to_pylist()]
    assert got == sorted(keys)
