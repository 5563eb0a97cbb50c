"""The Python API's own arguments: checked before anything is planned, loaded or written, and
refused as a JobError (InvalidJobError, exit code 2) with one line, like a bad job file."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmbatch.api import load, plan_job, run_job
from llmbatch.jobs.errors import InvalidJobError


@pytest.fixture
def job(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    return jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"))


def never(config):
    pytest.fail("the engine was built")


@pytest.mark.parametrize("kwargs, message", [
    (dict(progress="fancy"), "progress must be one of bar, log, none, got 'fancy'"),
    (dict(progress=None), "progress must be one of bar, log, none, got None"),
    (dict(log_every_s=-5), "log_every_s must be a number of seconds >= 0, got -5"),
    (dict(log_every_s=math.nan), "log_every_s must be a number of seconds >= 0, got nan"),
    (dict(log_every_s="10"), "log_every_s must be a number of seconds >= 0, got '10'"),
    (dict(log_every_s=True), "log_every_s must be a number of seconds >= 0, got True"),
    (dict(sets=5), "sets must be a 'section.key=value' string or a list of them, got 5"),
    (dict(sets=["sampling.seed=1", 2]), "sets must be a 'section.key=value' string or a list "
                                        "of them, got ['sampling.seed=1', 2]"),
])
def test_bad_arguments_are_refused_before_anything(job, tmp_path, kwargs, message):
    # progress="fancy" was a plain ValueError raised after planning and loading the model.
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=never, **kwargs)
    assert (info.value.message, info.value.exit_code) == (message, 2)
    assert not (tmp_path / "out").exists()


def test_engine_factory_must_be_callable(job):
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory="llmbatch.jobs.fake_engine:FakeEngine")
    assert info.value.message == "engine_factory must be callable (EngineConfig -> engine), got str"


def test_a_single_set_string_is_one_override(job):
    # It was iterated character by character ("--set 's': expected section.key=value").
    assert load(job, sets="sampling.max_new_tokens=3").sampling.max_new_tokens == 3
    assert plan_job(job, sets="shard.count=2").shard.count == 2
    result = run_job(job, sets="sampling.max_new_tokens=3")
    assert result.exit_code == 0
    tokens = pq.read_table(result.part_paths[0]).column("num_output_tokens").to_pylist()
    assert len(tokens) == 4 and max(tokens) <= 3


def test_sets_or_overrides_with_a_jobspec_are_refused(job):
    spec = load(job)
    message = ("sets and keyword overrides apply to a job file or dict; a JobSpec is already "
               "validated (use load(..., sets, **overrides) first)")
    with pytest.raises(InvalidJobError) as info:
        run_job(spec, sets=["sampling.seed=1"], engine_factory=never)
    assert info.value.message == message
    with pytest.raises(InvalidJobError) as info:
        run_job(spec, sampling={"seed": 1}, engine_factory=never)
    assert info.value.message == message
    assert run_job(spec).exit_code == 0


def test_pathlib_paths_in_a_job_dict_are_taken_like_strings(tmp_path, tiny_tokenizer_dir, jobkit,
                                                            fake_engine_env):
    # It raised "input.path: expected a string, got PosixPath(...)"; run_job(Path(...)) worked.
    first = Path(jobkit.write_prompts(str(tmp_path / "a.parquet"), 3))
    second = Path(jobkit.write_prompts(str(tmp_path / "b.parquet"), 2, seed=1))
    tok = Path(tiny_tokenizer_dir)
    job = {"model": {"path": tok, "tokenizer": tok}, "input": {"path": [first, second]},
           "sampling": {"max_new_tokens": 4}}
    result = run_job(job, output={"path": tmp_path / "out"})
    assert (result.exit_code, result.num_rows) == (0, 5)
    assert result.output_path == str(tmp_path / "out")
    spec = load(job, input={"path": first}, output={"path": tmp_path / "out"})
    assert (spec.input.path, spec.model.path, spec.model.tokenizer) == \
        (str(first), str(tok), str(tok))


def test_pathlib_paths_are_taken_in_every_path_key(tmp_path, tiny_tokenizer_dir):
    template = tmp_path / "chat.jinja"
    spec = load({"model": {"path": Path(tiny_tokenizer_dir), "chat_template": template},
                 "input": {"dataset": tmp_path / "ds"}, "output": {"path": tmp_path / "out"},
                 "speculative": {"method": "draft", "draft_model": tmp_path / "draft"}})
    assert (spec.model.chat_template, spec.input.dataset, spec.speculative.draft_model) == \
        (str(template), str(tmp_path / "ds"), str(tmp_path / "draft"))



def test_run_job_leaves_no_engine_behind(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    """A pipeline calls run_job again and again in one process: each job's engine (on a GPU,
    its weights and KV pool) must be collectable once run_job returns, or the next job's KV
    pool would be sized from what the last one still holds."""
    import gc
    import weakref

    from llmbatch.jobs.engine_factory import default_factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6)
    engines = []

    def factory(config):
        engine = default_factory(config)
        engines.append(weakref.ref(engine))
        return engine

    for i in range(2):
        job = jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / f"out{i}"),
                              engine={"device": "cpu"})
        assert run_job(job, engine_factory=factory).exit_code == 0
        gc.collect()
        assert len(engines) == i + 1 and engines[i]() is None


def test_the_package_run_job_takes_path_or_dict_by_name(tmp_path, tiny_tokenizer_dir, jobkit,
                                                        fake_engine_env):
    """llmbatch.run_job named its first argument spec_or_path, so run_job(path_or_dict=...)
    as the README and llmbatch.api spell it was a TypeError."""
    import llmbatch

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    result = llmbatch.run_job(path_or_dict=jobkit.make_job(tiny_tokenizer_dir, inp,
                                                           str(tmp_path / "out")))
    assert result.num_rows == 3


def test_sets_given_as_a_dict_is_named():
    from llmbatch.api import load
    from llmbatch.jobs.errors import InvalidJobError

    job = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "out"}}
    with pytest.raises(InvalidJobError) as info:
        load(job, sets={"sampling.max_new_tokens": 3})
    assert info.value.message == ("sets takes 'section.key=value' strings, not a dict; pass "
                                  "['sampling.max_new_tokens=3'], or the dict's sections as "
                                  "keyword overrides")
