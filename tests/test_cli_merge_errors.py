"""`llmbatch merge` failures: one line, exit 2, the destination untouched, no temporary left;
and the destinations it refuses (an existing file without --overwrite, a path in the merged
folder, a committed part)."""

import errno
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.cli import main


@pytest.fixture
def out_dir(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, monkeypatch):
    """A finished job of 9 rows in three parts under tmp_path/out; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    inp = jobkit.write_prompts("in.parquet", 9)
    run_job(jobkit.make_job(tiny_tokenizer_dir, inp, "out", output={"rows_per_part": 3}))
    return "out"


def call(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_into_a_missing_folder_is_one_line_exit_2(out_dir, tmp_path, capsys):
    code, out, err = call(capsys, "merge", out_dir, "-o", "nowhere/all.parquet")
    assert code == 2 and out == ""
    assert err == (f"llmbatch: error: --out nowhere/all.parquet: folder "
                   f"{tmp_path / 'nowhere'} does not exist\n")
    assert not os.path.exists("nowhere")


@pytest.mark.parametrize("dest, parent", [("afile/all.parquet", "afile"),
                                          ("afile/sub/all.parquet", "afile")])
def test_merge_into_a_folder_that_is_a_file_says_not_a_directory(out_dir, tmp_path, capsys,
                                                                 dest, parent):
    # It said "folder .../afile does not exist", while afile is right there (a file).
    with open("afile", "w") as f:
        f.write("a file")
    code, out, err = call(capsys, "merge", out_dir, "-o", dest)
    assert (code, out) == (2, "")
    assert err == f"llmbatch: error: --out {dest}: {tmp_path / parent} is not a directory\n"


def _read_only(*args, **kwargs):
    # What pyarrow and os raise on a read-only mount (root can write anywhere else here).
    raise OSError(errno.EROFS, "Failed to open local file '/ro/x.tmp'. Detail: [errno 30] "
                               "Read-only file system")


@pytest.mark.parametrize("target", ["llmbatch.io.merge.pq.ParquetWriter",
                                    "llmbatch.io.merge.os.replace"])
def test_merge_into_a_read_only_folder_is_the_users_error(out_dir, capsys, monkeypatch, target):
    # It was "internal error: OSError: [Errno 30] ..." and exit 1: the destination is the user's.
    monkeypatch.setattr(target, _read_only)
    code, out, err = call(capsys, "merge", out_dir, "-o", "all.parquet")
    monkeypatch.undo()
    assert (code, out) == (2, "")
    assert err == "llmbatch: error: --out all.parquet: cannot write it: Read-only file system\n"
    assert not os.path.exists("all.parquet")
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


def test_merge_with_a_damaged_part_keeps_the_old_destination(out_dir, capsys):
    part = os.path.join(out_dir, "part-00000-00001.parquet")
    with open(part, "rb") as f:
        data = f.read()
    with open(part, "wb") as f:
        f.write(data[: len(data) // 2])          # truncated: no Parquet footer
    with open("all.parquet", "w") as f:
        f.write("previous merge")
    code, out, err = call(capsys, "merge", out_dir, "-o", "all.parquet", "--overwrite")
    assert code == 2 and out == ""
    assert err.startswith(f"llmbatch: error: cannot read committed part {part}: ")
    assert err.count("\n") == 1
    with open("all.parquet") as f:
        assert f.read() == "previous merge"
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


def test_merge_failing_on_the_first_part_leaves_a_foreign_tmp_alone(out_dir, capsys):
    os.remove(os.path.join(out_dir, "part-00000-00000.parquet"))
    with open("all.parquet.tmp", "w") as f:
        f.write("not ours")
    code, _, err = call(capsys, "merge", out_dir, "-o", "all.parquet")
    assert code == 2 and "part-00000-00000.parquet is missing" in err
    with open("all.parquet.tmp") as f:
        assert f.read() == "not ours"
    assert not os.path.exists("all.parquet")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merge_still_writes_every_row_in_order(out_dir, capsys):
    with open("all.parquet.tmp", "w") as f:      # a user's file of the old temporary's name
        f.write("not ours")
    code, out, _ = call(capsys, "merge", out_dir, "-o", "all.parquet")
    assert code == 0 and out == "merged 3 parts, 9 rows -> all.parquet\n"
    assert pq.read_table("all.parquet").column("id").to_pylist() == list(range(9))
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == ["all.parquet.tmp"]
    with open("all.parquet.tmp") as f:
        assert f.read() == "not ours"
    assert os.stat("all.parquet").st_mode & 0o777 == 0o666 & ~_umask()


def test_merge_refuses_an_existing_destination_without_overwrite(out_dir, capsys):
    # It used to replace the file silently.
    with open("all.parquet", "w") as f:
        f.write("previous merge")
    code, out, err = call(capsys, "merge", out_dir, "-o", "all.parquet")
    assert (code, out) == (2, "")
    assert err == ("llmbatch: error: --out all.parquet: already exists; pass --overwrite to "
                   "replace it\n")
    with open("all.parquet") as f:
        assert f.read() == "previous merge"
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


def test_merge_overwrite_replaces_an_existing_destination(out_dir, capsys):
    with open("all.parquet", "w") as f:
        f.write("previous merge")
    code, out, _ = call(capsys, "merge", out_dir, "-o", "all.parquet", "--overwrite")
    assert code == 0 and out == "merged 3 parts, 9 rows -> all.parquet\n"
    assert pq.read_table("all.parquet").column("id").to_pylist() == list(range(9))
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


def folder_bytes(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("dest", ["out/all.parquet", "out/part-00000-00001.parquet",
                                  "out/_manifest/all.parquet", "./out/../out/all.parquet"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_merge_refuses_a_destination_in_the_merged_folder(out_dir, tmp_path, capsys, dest,
                                                          overwrite):
    # out/all.parquet used to be written: a later read of out/ returned every row twice.
    before = folder_bytes(out_dir)
    code, out, err = call(capsys, "merge", out_dir, "-o", dest, *overwrite)
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: --out {dest}: inside the merged folder {out_dir} (a later "
                   f"read of the folder would return the merged rows twice); write it "
                   f"elsewhere\n")
    assert folder_bytes(out_dir) == before


def test_merge_refuses_a_destination_that_is_a_committed_part(out_dir, capsys):
    # A part that is a link to a file outside the folder: replacing that file loses its rows.
    os.mkdir("store")
    part = os.path.join(out_dir, "part-00000-00001.parquet")
    os.replace(part, "store/p1.parquet")
    os.symlink(os.path.abspath("store/p1.parquet"), part)
    with open("store/p1.parquet", "rb") as f:
        data = f.read()
    code, out, err = call(capsys, "merge", out_dir, "-o", "store/p1.parquet", "--overwrite")
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: --out store/p1.parquet: is committed part {part}, an "
                   f"input of this merge; write it elsewhere\n")
    with open("store/p1.parquet", "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("flags", [[], ["--allow-partial"]])
def test_merge_of_missing_parts_says_missing_and_how_to_get_them_back(out_dir, capsys, flags):
    # It said "cannot read committed part out/part-00000-00001.parquet: out/part-...parquet".
    os.remove(os.path.join(out_dir, "part-00000-00001.parquet"))
    os.remove(os.path.join(out_dir, "part-00000-00002.parquet"))
    code, out, err = call(capsys, "merge", out_dir, "-o", "all.parquet", *flags)
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: committed part {out_dir}/part-00000-00001.parquet is "
                   f"missing (and 1 more); rerun the job (a resume computes missing parts "
                   f"again), then merge\n")
    assert os.listdir(".").count("all.parquet") == 0
    assert [f for f in os.listdir(".") if f.endswith(".tmp")] == []


@pytest.mark.parametrize("dest", ["all.csv", "all.json", "all", "all.parquet.gz", "out.csv/x"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_merge_refuses_a_destination_not_named_parquet(out_dir, tmp_path, capsys, dest,
                                                       overwrite):
    # `-o all.csv` wrote a Parquet file under a .csv name: merge writes Parquet only.
    os.makedirs("out.csv", exist_ok=True)
    with open("all.csv", "w") as f:          # an existing file of that name stays as it was
        f.write("a,b\n")
    before, parts = folder_bytes(tmp_path), folder_bytes(out_dir)
    code, out, err = call(capsys, "merge", out_dir, "-o", dest, *overwrite)
    assert (code, out) == (2, "")
    assert err == (f"llmbatch: error: --out {dest}: merge writes Parquet only; name a file "
                   f"ending in .parquet\n")
    assert folder_bytes(tmp_path) == before and folder_bytes(out_dir) == parts
    assert sorted(os.listdir(tmp_path)) == ["all.csv", "in.parquet", "out", "out.csv"]


def test_merge_takes_a_parquet_suffix_in_any_case(out_dir, capsys):
    code, out, _ = call(capsys, "merge", out_dir, "-o", "ALL.Parquet")
    assert code == 0 and out == "merged 3 parts, 9 rows -> ALL.Parquet\n"
    assert pq.read_table("ALL.Parquet").column("id").to_pylist() == list(range(9))
