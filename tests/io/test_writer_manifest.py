"""Atomic parts and the manifest: commit protocol, recovery of leftovers, hash check, clearing."""

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from llmbatch.io.manifest import Manifest
from llmbatch.io.writer import output_schema, read_part_metadata, rows_to_table, write_part
from llmbatch.jobs.errors import ResumeError


def table_of(ids):
    schema = output_schema(pa.schema([("prompt", pa.string())]), [], None)
    rows = [{"id": i, "output_text": f"t{i}", "output_token_ids": [i], "finish_reason": "stop",
             "num_prompt_tokens": 1, "num_cached_prompt_tokens": 0, "num_output_tokens": 1,
             "spec_accepted_tokens": 0} for i in ids]
    return rows_to_table(rows, schema)


def commit(out, shard, seq, lo, hi, config_hash="h"):
    path = write_part(str(out), shard, seq, table_of(range(lo, hi)), {"seq": seq})
    Manifest(str(out)).commit({"part": os.path.basename(path), "shard": shard, "seq": seq,
                               "row_start": lo, "row_end": hi, "config_hash": config_hash,
                               "num_errors": 0, "ids": list(range(lo, hi))})


def test_write_part_is_atomic_and_carries_metadata(tmp_path):
    seen = []

    def hook(stage):
        seen.append((stage, sorted(os.listdir(tmp_path))))

    path = write_part(str(tmp_path), 2, 7, table_of([1, 2]), {"seq": 7}, crash_hook=hook)
    assert os.path.basename(path) == "part-00002-00007.parquet"
    before, after = seen
    assert before[0] == "before_rename" and before[1][0].startswith("_tmp-part-00002-00007")
    assert after == ("after_rename", ["part-00002-00007.parquet"])
    assert read_part_metadata(path) == {"seq": 7}


def test_recover_drops_uncommitted_parts_and_temps(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    commit(tmp_path, 0, 1, 3, 6)
    write_part(str(tmp_path), 0, 2, table_of([6, 7]), {})      # renamed, never committed
    (tmp_path / "_tmp-part-00000-00003.parquet.123").write_bytes(b"half")
    commit(tmp_path, 1, 0, 6, 9)                                # another shard: untouched
    entries = Manifest(str(tmp_path)).recover(0, 0)
    assert [e["row_end"] for e in entries] == [3, 6]
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "part-00000-00000.parquet",
                                            "part-00000-00001.parquet", "part-00001-00000.parquet"]
    assert ds.dataset(str(tmp_path)).to_table().column("id").to_pylist() == list(range(9))


def test_recover_refuses_a_non_contiguous_manifest(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    with pytest.raises(ResumeError, match="not contiguous"):
        Manifest(str(tmp_path)).recover(0, 1)


def test_recover_uncommits_a_missing_part_and_the_later_ones(tmp_path):
    # A deleted committed part used to make the resume refuse (set output.mode: overwrite).
    for seq in range(4):
        commit(tmp_path, 0, seq, 3 * seq, 3 * seq + 3)
    os.remove(tmp_path / "part-00000-00001.parquet")
    manifest = Manifest(str(tmp_path))
    assert manifest.first_damaged(manifest.entries(0)) == (1, "missing")
    entries = manifest.recover(0, 0)
    assert [e["part"] for e in entries] == ["part-00000-00000.parquet"]
    assert manifest.dropped == ("committed part part-00000-00001.parquet is missing; its rows "
                                "and those of the 2 parts after it are produced again")
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "part-00000-00000.parquet"]
    assert os.listdir(tmp_path / "_manifest") == ["part-00000-00000.json"]


def test_recover_uncommits_a_damaged_part_and_the_later_ones(tmp_path):
    for seq in range(4):
        commit(tmp_path, 0, seq, 3 * seq, 3 * seq + 3)
    commit(tmp_path, 1, 0, 12, 15)                              # another shard: untouched
    part = tmp_path / "part-00000-00001.parquet"
    part.write_bytes(part.read_bytes()[:-20])                   # truncated: footer gone
    manifest = Manifest(str(tmp_path))
    assert manifest.first_damaged(manifest.entries(0)) == (1, (
        "unreadable: Parquet magic bytes not found in footer. Either the file is corrupted or "
        "this is not a parquet file."))
    entries = manifest.recover(0, 0)
    assert [e["part"] for e in entries] == ["part-00000-00000.parquet"]
    assert manifest.dropped == (
        "committed part part-00000-00001.parquet is damaged (unreadable: Parquet magic bytes "
        "not found in footer. Either the file is corrupted or this is not a parquet file.); its "
        "rows and those of the 2 parts after it are produced again")
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "part-00000-00000.parquet",
                                            "part-00001-00000.parquet"]
    assert sorted(os.listdir(tmp_path / "_manifest")) == ["part-00000-00000.json",
                                                          "part-00001-00000.json"]
    assert ds.dataset(str(tmp_path)).to_table().column("id").to_pylist() == [0, 1, 2, 12, 13, 14]


def test_recover_uncommits_a_part_with_another_row_count(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    commit(tmp_path, 0, 1, 3, 6)
    write_part(str(tmp_path), 0, 1, table_of([3, 4]), {})      # readable, one row short
    manifest = Manifest(str(tmp_path))
    assert manifest.recover(0, 0) == manifest.entries(0)[:1]
    assert manifest.dropped == ("committed part part-00000-00001.parquet is damaged (holds 2 "
                                "rows, the manifest records 3); its rows are produced again")
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "part-00000-00000.parquet"]
    assert Manifest(str(tmp_path)).recover(0, 0) == manifest.entries(0)


def test_check_hash(tmp_path):
    commit(tmp_path, 0, 0, 0, 3, config_hash="aaaa")
    settings = {"output_rules": 2, "sampling": {"seed": 0}}
    Manifest(str(tmp_path)).check_hash("aaaa", settings, 0, 1)
    with pytest.raises(ResumeError) as info:        # an entry without recorded settings
        Manifest(str(tmp_path)).check_hash("bbbb", settings, 0, 1)
    assert str(info.value) == (f"output.path {tmp_path} was written by an earlier llmbatch "
                               f"version that does not record its settings (config hash aaaa, "
                               f"this job's is bbbb); rerun it with the llmbatch version that "
                               f"wrote it, use another output.path, or set output.mode: "
                               f"overwrite (deletes the 3 committed rows)")


def test_check_hash_names_the_settings_or_the_hashes(tmp_path):
    manifest = Manifest(str(tmp_path))
    settings = {"output_rules": 2, "model": {"path": "m", "chat_template": "sha256:" + "ab" * 32},
                "sampling": {"seed": 0, "stop": ["\n\n"]}}
    commit(tmp_path, 0, 0, 0, 3, config_hash="aaaa")
    commit(tmp_path, 0, 1, 3, 4, config_hash="aaaa")
    commit(tmp_path, 1, 0, 4, 6, config_hash="aaaa")
    for name in os.listdir(tmp_path / "_manifest"):
        path = tmp_path / "_manifest" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "settings": settings}))
    ours = {**settings, "model": {"path": "m", "chat_template": "auto"},
            "sampling": {"seed": 0, "stop": []}}
    with pytest.raises(ResumeError) as info:
        manifest.check_hash("bbbb", ours, 0, 2)
    assert str(info.value) == (
        f"output.path {tmp_path} was written with different settings: model.chat_template "
        f"sha256:ababababababababababababababab... -> auto, sampling.stop [\"\\n\\n\"] -> []; "
        f"rerun with the original settings, use another output.path, or set output.mode: "
        f"overwrite (deletes the 4 committed rows of shard 0)")
    # Equal recorded settings (an entry edited by hand): the hashes are all there is to say.
    with pytest.raises(ResumeError) as info:
        manifest.check_hash("bbbb", settings, 1, 2)
    assert str(info.value) == (
        f"output.path {tmp_path} was written by a job with config hash aaaa, this job's is "
        f"bbbb; rerun with the settings that wrote it, use another output.path, or set "
        f"output.mode: overwrite (deletes the 2 committed rows of shard 1)")


def test_clear_one_shard_or_all(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    commit(tmp_path, 1, 0, 3, 6)
    (tmp_path / "notes.txt").write_text("user file")
    Manifest(str(tmp_path)).clear(0, all_shards=False)
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "notes.txt", "part-00001-00000.parquet"]
    assert os.listdir(tmp_path / "_manifest") == ["part-00001-00000.json"]
    Manifest(str(tmp_path)).clear(0, all_shards=True)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_clear_deletes_only_llmbatch_names(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    (tmp_path / "_stats").mkdir()
    ours = ["_tmp-part-00000-00001.parquet.42", "_manifest/_tmp-part-00000-00001.json.42",
            "_stats/stats-00000-000.parquet", "_stats/_tmp-stats-00000-001.parquet.42"]
    foreign = ["part-00000-0f1c9a2e-77b1-4a53-9d1e-3c2f.snappy.parquet", "_SUCCESS",
               "_lock-00000", "part-00000-00000.parquet.bak", "_manifest/part-00000-notes.json",
               "_manifest/README", "_stats/README", "_stats/stats-00000-000.csv"]
    for name in ours + foreign:
        (tmp_path / name).write_text(name)
    Manifest(str(tmp_path)).clear(0, all_shards=True)
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                  for d, _, files in os.walk(tmp_path) for f in files)
    assert left == sorted(foreign)
    assert all((tmp_path / name).read_text() == name for name in foreign)


def test_clear_removes_emptied_folders_of_a_one_shard_job_only(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    commit(tmp_path, 1, 0, 3, 6)
    Manifest(str(tmp_path)).clear(1, all_shards=False, shard_count=2)
    assert sorted(os.listdir(tmp_path)) == ["_manifest", "part-00000-00000.parquet"]
    Manifest(str(tmp_path)).clear(0, all_shards=False, shard_count=2)
    assert os.listdir(tmp_path) == ["_manifest"] and os.listdir(tmp_path / "_manifest") == []


def test_manifest_entry_records_ids(tmp_path):
    commit(tmp_path, 0, 0, 0, 3)
    with open(tmp_path / "_manifest" / "part-00000-00000.json") as f:
        assert json.load(f)["ids"] == [0, 1, 2]


def test_recover_message_counts_one_later_part_and_none(tmp_path):
    for seq in range(3):
        commit(tmp_path, 0, seq, 3 * seq, 3 * seq + 3)
    os.remove(tmp_path / "part-00000-00001.parquet")
    manifest = Manifest(str(tmp_path))
    manifest.recover(0, 0)
    assert manifest.dropped == ("committed part part-00000-00001.parquet is missing; its rows "
                                "and those of the 1 part after it are produced again")
    os.remove(tmp_path / "part-00000-00000.parquet")
    manifest = Manifest(str(tmp_path))
    assert manifest.recover(0, 0) == []
    assert manifest.dropped == ("committed part part-00000-00000.parquet is missing; its rows "
                                "are produced again")


def test_entries_skip_an_entry_removed_since_the_listing(tmp_path, monkeypatch):
    """Another shard un-committing its own parts removes entries while this run lists all of
    them (check_hash on resume, merge): a vanished entry is skipped, not 'unreadable, set
    output.mode: overwrite'."""
    commit(tmp_path, 0, 0, 0, 3)
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: real(p) + (
        ["part-00001-00004.json"] if str(p).endswith("_manifest") else []))
    assert [e["part"] for e in Manifest(str(tmp_path)).entries()] == ["part-00000-00000.parquet"]


def test_a_part_that_cannot_be_looked_at_refuses_instead_of_recomputing(tmp_path, monkeypatch):
    """Only a part that does not exist is 'missing' (recomputed, with every later part): a stale
    network handle or a permission error refuses in one line, and nothing is deleted."""
    import errno

    from llmbatch.io import writer

    for seq in range(3):
        commit(tmp_path, 0, seq, 3 * seq, 3 * seq + 3)
    real = os.stat
    target = str(tmp_path / "part-00000-00001.parquet")

    def stale(p, *a, **k):
        if str(p) == target:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(p, *a, **k)

    monkeypatch.setattr(writer.os, "stat", stale)
    manifest = Manifest(str(tmp_path))
    with pytest.raises(ResumeError) as info:
        manifest.recover(0, 0)
    assert str(info.value) == (f"cannot check committed part {target}: [Errno 116] Stale file "
                               f"handle; rerun when it is reachable")
    monkeypatch.undo()
    assert len(Manifest(str(tmp_path)).entries(0)) == 3
