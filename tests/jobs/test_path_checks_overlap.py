"""input.path and output.path must not overlap: a job whose output lies where its input is read
would read its own parts as input on the next run (the tester's out/b2 + out/b2/chain: the
first run exited 0, every rerun failed). Refused at the first run: exit 2, one line naming both
paths, nothing written, before the model loads."""

import os

import pytest
import yaml

from llmbatch import run_job
from llmbatch.cli import main
from llmbatch.jobs.errors import EXIT_INVALID, InvalidJobError
from llmbatch.jobs.path_checks import check_input_output_overlap


@pytest.fixture
def no_engine():
    def factory(config):  # pragma: no cover - must never be reached
        raise AssertionError("the engine was built for an invalid job")
    return factory


def _refused(job, engine) -> str:
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=engine)
    assert info.value.exit_code == EXIT_INVALID
    return info.value.message


def test_output_inside_the_input_folder_is_refused_on_the_first_run(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env, capsys, monkeypatch):
    # The tester's case, relative paths and the CLI: one line, exit 2, nothing created.
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/b2")
    jobkit.write_prompts("out/b2/in.parquet", 6)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(jobkit.make_job(tiny_tokenizer_dir, "out/b2", "out/b2/chain")))
    code = main(["run", str(job), "--progress", "none"])
    _, err = capsys.readouterr()
    assert code == EXIT_INVALID
    assert err == ("llmbatch: error: output.path out/b2/chain is inside input.path out/b2: a "
                   "rerun would read the job's own output as input; use an output.path outside "
                   "the input (or a folder whose name starts with _ or .)\n")
    assert not os.path.exists("out/b2/chain")
    assert main(["plan", str(job)]) == EXIT_INVALID


def test_input_inside_the_output_folder_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                   no_engine):
    # (The overlap check runs before the foreign-data check of output.path.)
    os.makedirs(tmp_path / "out" / "data")
    inp = jobkit.write_prompts(str(tmp_path / "out" / "data" / "in.parquet"), 4)
    message = _refused(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out")), no_engine)
    assert message == (f"input.path {inp} is inside output.path {tmp_path / 'out'}: the input "
                       f"would be mixed with the results; use an output.path outside the input")


def test_input_equal_to_the_output_folder_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                     no_engine):
    os.makedirs(tmp_path / "d")
    jobkit.write_prompts(str(tmp_path / "d" / "in.parquet"), 4)
    message = _refused(jobkit.make_job(tiny_tokenizer_dir, str(tmp_path / "d") + "/",
                                       str(tmp_path / "d")), no_engine)
    assert message == (f"input.path {tmp_path / 'd'}/ and output.path {tmp_path / 'd'} are the "
                       f"same folder: a rerun would read the job's own output as input; use an "
                       f"output.path outside the input")


def test_a_glob_that_would_match_parts_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                  no_engine):
    # Today the glob matches only in.parquet; after one run it would match the parts too.
    os.makedirs(tmp_path / "data" / "a")
    jobkit.write_prompts(str(tmp_path / "data" / "a" / "in.parquet"), 4)
    pattern = str(tmp_path / "data" / "**" / "*.parquet")
    out = str(tmp_path / "data" / "results")
    message = _refused(jobkit.make_job(tiny_tokenizer_dir, [pattern], out), no_engine)
    assert message == (f"input.path {pattern} would match files under output.path {out}: a "
                       f"rerun would read the job's own output as input; use an output.path "
                       f"outside the input")


def test_one_entry_of_a_list_overlapping_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                    no_engine):
    a = jobkit.write_prompts(str(tmp_path / "a.parquet"), 2)
    os.makedirs(tmp_path / "b")
    jobkit.write_prompts(str(tmp_path / "b" / "x.parquet"), 2)
    out = str(tmp_path / "b" / "out")
    message = _refused(jobkit.make_job(tiny_tokenizer_dir, [a, str(tmp_path / "b")], out),
                       no_engine)
    assert message.startswith(f"output.path {out} is inside input.path {tmp_path / 'b'}: ")


def test_output_inside_the_input_through_a_symlink_is_refused(tmp_path):
    os.makedirs(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "link")
    with pytest.raises(InvalidJobError, match=r"^output.path .*/link/out is inside input.path "):
        check_input_output_overlap(str(tmp_path / "data"), str(tmp_path / "link" / "out"))


@pytest.mark.parametrize("inputs, out", [
    (["data/*.parquet"], "data/out"),          # '*' does not cross '/': parts are not matched
    (["data/in.parquet"], "data/out"),         # a file next to the output folder
    (["data"], "data/_results"),               # hidden below the input: no reader takes it
    (["res/_inputs/in.parquet"], "res"),       # input hidden below the output: likewise
    (["res/.cache/*.parquet"], "res"),
    (["data/**/*.csv"], "data/out"),           # matches no name llmbatch writes
    (["s3://bucket/data"], "data/out"),        # a URL cannot be the local output folder
    (["data"], "data2/out"),                   # a shared name prefix is not nesting
])
def test_disjoint_paths_pass(tmp_path, monkeypatch, inputs, out):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    check_input_output_overlap(inputs, out)


def test_disjoint_job_runs(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    os.makedirs(tmp_path / "data")
    jobkit.write_prompts(str(tmp_path / "data" / "in.parquet"), 4)
    job = jobkit.make_job(tiny_tokenizer_dir, str(tmp_path / "data"),
                          str(tmp_path / "data" / "_results"))
    assert run_job(job).exit_code == 0
    assert run_job(job).num_rows_skipped == 4


def test_input_kept_under_a_hidden_folder_of_the_output_runs(tmp_path, tiny_tokenizer_dir,
                                                              jobkit, fake_engine_env):
    """res/_inputs/in.parquet with output.path res: readers of the results, the foreign-data
    check and overwrite's clean-up all pass _ names by (found in review: it was refused)."""
    os.makedirs(tmp_path / "res" / "_inputs")
    inp = jobkit.write_prompts(str(tmp_path / "res" / "_inputs" / "in.parquet"), 4)
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "res"))
    assert run_job(job).exit_code == 0
    assert run_job(job, output={"mode": "overwrite"}).num_rows_ok == 4
    assert os.path.exists(inp)



def test_output_inside_a_local_dataset_folder_is_refused(tmp_path, tiny_tokenizer_dir, jobkit,
                                                         no_engine):
    # A data folder loaded with `datasets` reads every data file in it: the parts too, on a rerun.
    os.makedirs(tmp_path / "data")
    jobkit.write_prompts(str(tmp_path / "data" / "train.parquet"), 4)
    job = jobkit.make_job(tiny_tokenizer_dir, None, str(tmp_path / "data" / "out"))
    job["input"] = {"dataset": str(tmp_path / "data")}
    message = _refused(job, no_engine)
    assert message == (f"output.path {tmp_path / 'data' / 'out'} is inside input.dataset "
                       f"{tmp_path / 'data'}: a rerun would read the job's own output as input; "
                       f"use an output.path outside the input (or a folder whose name starts "
                       f"with _ or .)")
