"""A resume after the input changed but kept its row count (fake engine).

Only the row count was compared: an input re-exported in another order, or with a prompt or a
kept column edited, resumed with exit 0 and the folder mixed rows answered from the old input
with rows of the new one. Each manifest entry now records a digest of the input rows its part
was written from (io/input_digest.py); a resume compares it and refuses (exit 2). The digest
does not depend on how the input is cut into batches or files, so a resume of the same rows
still runs."""

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch.cli import main
from llmbatch.io.input_digest import ENTRY_KEY, RowDigests, part_digest, row_digests

PROMPTS = [f"p {i} q" for i in range(20)]


def _write_input(tmp_path, prompts=PROMPTS, tags=None, files=1) -> None:
    frame = pd.DataFrame({"prompt": prompts,
                          "tag": tags if tags is not None else [f"t{i}" for i in range(20)]})
    for old in tmp_path.glob("inp/*.parquet"):
        old.unlink()
    (tmp_path / "inp").mkdir(exist_ok=True)
    cut = len(frame) // files
    for f in range(files):
        chunk = frame.iloc[f * cut: len(frame) if f == files - 1 else (f + 1) * cut]
        chunk.to_parquet(tmp_path / "inp" / f"f{f}.parquet", index=False)


def _run_then_lose_last_parts(tmp_path, jobkit, tokenizer_dir, monkeypatch, lose=2) -> None:
    """A full run of 20 rows in parts of 7/7/6, then its last `lose` parts gone (as after a
    crash before they were committed)."""
    monkeypatch.chdir(tmp_path)
    _write_input(tmp_path)
    job = jobkit.make_job(tokenizer_dir, "inp", "out", output={"rows_per_part": 7},
                          input={"keep_columns": ["tag"], "batch_size": 4})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    for seq in range(3 - lose, 3):
        os.remove(tmp_path / "out" / f"part-00000-{seq:05d}.parquet")
        os.remove(tmp_path / "out" / "_manifest" / f"part-00000-{seq:05d}.json")


def _resume(*sets) -> int:
    args = ["run", "job.yaml", "--progress", "none", "--set", "output.mode=resume"]
    for item in sets:
        args += ["--set", item]
    return main(args)


def _out(tmp_path) -> pa.Table:
    return ds.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")


@pytest.mark.parametrize("change", ["reordered", "prompt_edited", "kept_column_edited"])
def test_resume_refuses_an_input_changed_with_its_row_count(change, tmp_path, tiny_tokenizer_dir,
                                                            jobkit, fake_engine_env, monkeypatch,
                                                            capsys):
    _run_then_lose_last_parts(tmp_path, jobkit, tiny_tokenizer_dir, monkeypatch)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    if change == "reordered":
        _write_input(tmp_path, prompts=PROMPTS[::-1], tags=[f"t{i}" for i in range(20)][::-1])
    elif change == "prompt_edited":
        _write_input(tmp_path, prompts=PROMPTS[:3] + ["p 3 edited"] + PROMPTS[4:])
    else:
        _write_input(tmp_path, tags=[f"t{i}" for i in range(6)] + ["new"]
                     + [f"t{i}" for i in range(7, 20)])
    capsys.readouterr()
    assert _resume() == 2
    err = capsys.readouterr().err
    assert err == ("llmbatch: error: output.path out: input rows [0, 7) are not the rows "
                   "part-00000-00000.parquet was written from (the input changed since); "
                   "restore the input, or set output.mode: overwrite to start over\n"), err
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    # Nothing written or deleted (the lock file of a refused run is not left either).
    assert after == before
    assert main(["plan", "job.yaml", "--set", "output.mode=resume"]) == 2
    # As the error says: overwrite starts over, and every row answers the new input.
    assert _resume("output.mode=overwrite") == 0
    table = _out(tmp_path)
    inp = ds.dataset(str(tmp_path / "inp"), format="parquet").to_table()
    assert table.column("tag").to_pylist() == inp.column("tag").to_pylist()


def test_an_edit_in_a_later_part_names_that_part(tmp_path, tiny_tokenizer_dir, jobkit,
                                                 fake_engine_env, monkeypatch, capsys):
    _run_then_lose_last_parts(tmp_path, jobkit, tiny_tokenizer_dir, monkeypatch, lose=1)
    _write_input(tmp_path, prompts=PROMPTS[:13] + ["p 13 edited"] + PROMPTS[14:])
    capsys.readouterr()
    assert _resume() == 2
    assert "input rows [7, 14) are not the rows part-00000-00001.parquet" in \
        capsys.readouterr().err
    # An edit in rows no part holds yet is simply read by the resume.
    _write_input(tmp_path, prompts=PROMPTS[:16] + ["p 16 edited"] + PROMPTS[17:])
    assert _resume() == 0


def test_the_same_rows_cut_otherwise_resume(tmp_path, tiny_tokenizer_dir, jobkit,
                                            fake_engine_env, monkeypatch):
    """Other batch sizes and another split into files give the same digests."""
    _run_then_lose_last_parts(tmp_path, jobkit, tiny_tokenizer_dir, monkeypatch)
    want = _out(tmp_path).column("output_text").to_pylist()
    _write_input(tmp_path, files=3)
    assert _resume("input.batch_size=3") == 0
    table = _out(tmp_path)
    assert table.column("id").to_pylist() == list(range(20))
    assert table.column("output_text").to_pylist()[:7] == want
    entries = [json.loads(p.read_text()) for p in sorted((tmp_path / "out/_manifest").glob("*"))]
    assert all(isinstance(e[ENTRY_KEY], str) for e in entries)


def test_entries_written_before_digests_still_resume(tmp_path, tiny_tokenizer_dir, jobkit,
                                                     fake_engine_env, monkeypatch):
    _run_then_lose_last_parts(tmp_path, jobkit, tiny_tokenizer_dir, monkeypatch)
    entry_path = tmp_path / "out" / "_manifest" / "part-00000-00000.json"
    entry = json.loads(entry_path.read_text())
    del entry[ENTRY_KEY]
    entry_path.write_text(json.dumps(entry))
    assert _resume() == 0
    assert _out(tmp_path).column("id").to_pylist() == list(range(20))


def test_row_digests_tell_values_apart():
    table = pa.table({"a": pa.array(["x", "", None, "ab", "a"], pa.string()),
                      "b": pa.array(["", "x", "", None, "b"], pa.string())})
    digests = row_digests(table, ["a", "b"])
    # ("x", "") vs ("", "x"), null vs "", ("ab", null) vs ("a", "b"): all differ.
    assert len(set(digests)) == 5
    # Batching and chunking do not matter; column order does.
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=2))
    assert row_digests(chunked, ["a", "b"]) == digests
    assert row_digests(table, ["b", "a"]) != digests
    # Text read without UTF-8 checks (CSV) is hashed as bytes, not decoded.
    bad = pa.array([b"caf\xe9"], pa.binary()).view(pa.string())
    assert row_digests(pa.table({"a": bad}), ["a"]) != row_digests(
        pa.table({"a": pa.array(["caf\u00e9"])}), ["a"])
    # Non-text values (messages lists of structs, numbers) by their JSON.
    messages = pa.array([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "ho"}]])
    assert len(set(row_digests(pa.table({"m": messages}), ["m"]))) == 2
    kept = RowDigests(["a", "b"])
    kept.add(10, table)
    assert kept.take(10, 12) == part_digest(digests[:2])
    assert kept.take(10, 12) is None          # taken once
    assert kept.take(12, 16) is None          # row 15 never added


def _bad_utf8_messages(texts_as_bytes):
    """A messages column whose contents are the given bytes (not all valid UTF-8)."""
    content = pa.array(texts_as_bytes, pa.binary()).view(pa.string())
    role = pa.array(["user"] * len(texts_as_bytes))
    structs = pa.StructArray.from_arrays([role, content], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(range(len(texts_as_bytes) + 1), pa.int32()), structs)


def test_text_that_is_not_utf8_inside_a_messages_column_stays_its_rows_error(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch, capsys):
    """The digest decoded nested text (to_pylist): a latin-1 byte in one message ended the job
    (exit 1, 'engine failed: UnicodeDecodeError') where it is that row's error (exit 3)."""
    monkeypatch.chdir(tmp_path)
    texts = [f"p {i} q".encode() for i in range(10)]
    texts[4] = b"caf\xe9"
    pq.write_table(pa.table({"msgs": _bad_utf8_messages(texts)}), tmp_path / "in.parquet")
    job = jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out", output={"rows_per_part": 3},
                          input={"messages_column": "msgs"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none"]) == 3
    table = _out(tmp_path)
    assert table.column("finish_reason").to_pylist().count("error") == 1
    assert "not valid UTF-8" in table.column("error").to_pylist()[4]
    # A resume of the same rows runs; one edited inside a committed part is refused (exit 2).
    os.remove(tmp_path / "out" / "part-00000-00003.parquet")
    os.remove(tmp_path / "out" / "_manifest" / "part-00000-00003.json")
    assert _resume() == 3
    texts[5] = b"caf\xe8"
    pq.write_table(pa.table({"msgs": _bad_utf8_messages(texts)}), tmp_path / "in.parquet")
    capsys.readouterr()
    assert _resume() == 2
    assert "input rows [3, 6) are not the rows part-00000-00001.parquet" in \
        capsys.readouterr().err


def test_numbers_and_nested_values_digest_without_json_per_value():
    table = pa.table({"n": pa.array([1, None, 3]), "f": pa.array([0.5, 2.0, None]),
                      "l": pa.array([["a"], [], None])})
    digests = row_digests(table, ["n", "f", "l"])
    assert len(set(digests)) == 3
    other = pa.table({"n": pa.array([1, None, 4]), "f": pa.array([0.5, 2.0, None]),
                      "l": pa.array([["a"], [], None])})
    assert row_digests(other, ["n", "f", "l"])[:2] == digests[:2]
    assert row_digests(other, ["n", "f", "l"])[2] != digests[2]


def test_review_ints_and_floats_differ_and_more_containers_do_not_decode():
    """2.0 and 2 digested alike once numbers were cast to text (a kept int column re-exported
    as float resumed, and the parts mixed column types); fixed-size lists, list views and
    dictionaries inside lists were decoded by to_pylist (UnicodeDecodeError, exit 1)."""
    assert row_digests(pa.table({"n": pa.array([2])}), ["n"]) != \
        row_digests(pa.table({"n": pa.array([2.0])}), ["n"])
    bad = pa.array([b"caf\xe9", b"x"], pa.binary()).view(pa.string())
    for column in (pa.FixedSizeListArray.from_arrays(bad, 1),
                   pa.ListViewArray.from_arrays(pa.array([0, 1], pa.int32()),
                                                pa.array([1, 1], pa.int32()), bad),
                   pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()),
                                            bad.dictionary_encode())):
        assert len(set(row_digests(pa.table({"c": column}), ["c"]))) == 2


@pytest.mark.parametrize("ran", [1, 0])
def test_another_row_count_is_named(ran, tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                    monkeypatch, capsys):
    """Two shards; shard `ran` finished on 20 rows, the input grew by 2 and shard 1 resumes.
    ran=1: its range moved, which read as 'manifest of shard 1 is not contiguous'; ran=0:
    shard 1 had no entries and resumed with exit 0, row 10 falling between the ranges (only
    this shard's entries were compared)."""
    monkeypatch.chdir(tmp_path)
    _write_input(tmp_path)
    job = jobkit.make_job(tiny_tokenizer_dir, "inp", "out", shard={"index": ran, "count": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none"]) == 0
    _write_input(tmp_path, prompts=PROMPTS + ["x", "y"], tags=[f"t{i}" for i in range(22)])
    capsys.readouterr()
    assert _resume("shard.index=1") == 2
    assert capsys.readouterr().err == ("llmbatch: error: output.path out was written for an "
                                       "input of 20 rows, the input now has 22; set "
                                       "output.mode: overwrite to start over\n")
