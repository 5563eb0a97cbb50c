"""The exact names llmbatch writes in an output folder: only they are ever deleted."""

import os

from llmbatch.io.layout import deletable_shard, foreign_entries


def test_deletable_names_are_exact():
    assert deletable_shard("", "part-00003-00001.parquet") == 3
    assert deletable_shard("", "part-123456-00001.parquet") == 123456
    assert deletable_shard("", "_tmp-part-00003-00001.parquet.4242") == 3
    assert deletable_shard("_manifest", "part-00002-00000.json") == 2
    assert deletable_shard("_manifest", "_tmp-part-00002-00000.json.77") == 2
    assert deletable_shard("_stats", "stats-00001-004.parquet") == 1
    assert deletable_shard("_stats", "_tmp-stats-00001-004.parquet.9") == 1
    not_ours = [("", "part-00000-0f1c9a2e-77b1-4a53-9d1e-3c2f.snappy.parquet"),
                ("", "part-00000.parquet"), ("", "part-00000-00000.parquet.bak"),
                ("", "_lock-00000"), ("", "_SUCCESS"), ("", "_tmp-part-00000-00000.parquet"),
                ("", "part-00000-00000.json"), ("_manifest", "part-00000-00000.parquet"),
                ("_manifest", "notes.json"), ("_stats", "README"),
                ("_stats", "stats-00000-000.csv"), ("_stats", "part-00000-00000.parquet"),
                ("other", "part-00000-00000.parquet")]
    assert [deletable_shard(folder, name) for folder, name in not_ours] == [None] * len(not_ours)


def test_foreign_entries_are_what_readers_would_read(tmp_path):
    assert foreign_entries(str(tmp_path / "missing")) == []
    for name in ("part-00000-00000.parquet", "_SUCCESS", ".part-0.crc", "_lock-00000",
                 "part-00000-abc.snappy.parquet", "notes.txt"):
        (tmp_path / name).write_text("x")
    os.makedirs(tmp_path / "_stats")
    os.makedirs(tmp_path / "year=2024")
    os.makedirs(tmp_path / "part-00001-00000.parquet")        # a folder is not our part
    assert foreign_entries(str(tmp_path)) == ["notes.txt", "part-00000-abc.snappy.parquet",
                                              "part-00001-00000.parquet", "year=2024"]


def test_a_part_deleted_by_another_shard_meanwhile_is_not_foreign(tmp_path, monkeypatch):
    """A requeued task of another shard may delete one of its own parts between our listing
    and the check; that name must not make this run refuse (it counted as foreign data, and a
    healthy SLURM array task exited 2). A directory with a part's name is still foreign."""
    (tmp_path / "part-00001-00000.parquet").mkdir()
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: real(p) + ["part-00002-00007.parquet"])
    assert foreign_entries(str(tmp_path)) == ["part-00001-00000.parquet"]
