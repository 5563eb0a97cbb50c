"""Settings far past any sane value were exit 1 (an internal error) instead of a one-line
exit 2 (helper review): input.batch_size 1e20 (OverflowError in Arrow's reader), sampling.n
1e14 (MemoryError), shard.count 1e20 in the job or SLURM_ARRAY_TASK_COUNT (the run committed
a part, then failed writing stats; merge's set of shard indices took all memory). Fake
engine."""

import pytest
import yaml

from llmbatch.cli import main


@pytest.mark.parametrize("setting, expected", [
    ("input.batch_size=99999999999999999999", "input.batch_size"),
    ("sampling.n=99999999999999", "sampling.n"),
    ("shard.count=99999999999999999999", "shard.count must be in [1, 4000001], got"),
])
def test_huge_settings_are_exit_2(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                  monkeypatch, capsys, setting, expected):
    monkeypatch.chdir(tmp_path)
    jobkit.write_prompts(str(tmp_path / "inp.parquet"), 3)
    job = jobkit.make_job(tiny_tokenizer_dir, "inp.parquet", "out",
                          sampling={"temperature": 0.5})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", "job.yaml", "--progress", "none", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbatch: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_huge_slurm_array_count_is_exit_2(tmp_path, tiny_tokenizer_dir, jobkit,
                                            fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    jobkit.write_prompts(str(tmp_path / "inp.parquet"), 3)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        jobkit.make_job(tiny_tokenizer_dir, "inp.parquet", "out")))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "99999999999999999999")
    assert main(["run", "job.yaml", "--progress", "none"]) == 2
    assert capsys.readouterr().err == ("llmbatch: error: shard.count must be in [1, 4000001], "
                                       "got 99999999999999999999\n")
    assert not (tmp_path / "out").exists()


def test_max_model_len_of_one_is_refused(tmp_path, monkeypatch, capsys):
    """engine.max_model_len: 1 was accepted and every row became an error row (exit 3): no
    prompt leaves room for an output token. 0 and null stay the model's own length."""
    from llmbatch.api import load
    from llmbatch.jobs.errors import InvalidJobError

    job = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "out"}}
    with pytest.raises(InvalidJobError, match=r"^engine.max_model_len: must be 0 or null \(the "
                                              r"model's own context length\) or >= 2: a row "
                                              r"needs a prompt token and an output token"):
        load(job, engine={"max_model_len": 1})
    for value in (0, None, 2):
        assert load(job, engine={"max_model_len": value}).engine.max_model_len == value
