"""plan_job takes a JobSpec as run_job does: a pipeline that validated a job with load() could
run it but not plan it ('a job is a path to a YAML file or a dict, got JobSpec'). And a custom
engine_factory that returns no engine is a one-line JobError, not an AttributeError from the
runner ('NoneType' object has no attribute 'tokenizer')."""

import pytest

from llmbatch.api import InternalError, InvalidJobError, load, plan_job, run_job


@pytest.fixture
def job(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    return jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"))


def test_plan_job_takes_a_jobspec(job):
    spec = load(job)
    assert plan_job(spec).num_input_rows == 4
    run_job(spec)
    assert plan_job(spec).rows_done == 4


def test_plan_job_refuses_overrides_with_a_jobspec(job):
    with pytest.raises(InvalidJobError) as info:
        plan_job(load(job), sets=["sampling.seed=1"])
    assert info.value.message == ("sets and keyword overrides apply to a job file or dict; a "
                                  "JobSpec is already validated (use load(..., sets, "
                                  "**overrides) first)")


@pytest.mark.parametrize("made", [None, "engine"])
def test_an_engine_factory_that_returns_no_engine(job, tmp_path, made):
    with pytest.raises(InternalError) as info:
        run_job(job, engine_factory=lambda config: made)
    assert info.value.message == (f"engine_factory returned {type(made).__name__}, not an "
                                  f"engine (it needs tokenizer, max_model_len and generate)")
    assert not (tmp_path / "out").exists()     # as after any model that cannot be loaded
