"""A value that is job-wide and would make EVERY row fail is a job error: InvalidJobError
(exit 2) at start, the output folder untouched, not one error row per prompt (exit 3)."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


@pytest.fixture
def run_refused(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    """Run a job of 5 prompts on the fake engine; return the InvalidJobError's message after
    checking that nothing was written."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    out = tmp_path / "out"

    def run(**sections) -> str:
        with pytest.raises(InvalidJobError) as info:
            run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(out), **sections))
        assert info.value.exit_code == 2
        assert not out.exists()
        return info.value.message

    return run


def test_chat_template_that_does_not_compile(run_refused, tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}{{ m.content }\n")
    assert run_refused(model={"chat_template": str(path)}) == (
        f"model.chat_template {path}: the template does not compile at line 1: "
        f"TemplateSyntaxError: unexpected '}}'")


# The fake engine: max_model_len 512 (no config.json), vocabulary = the tiny tokenizer's 384.
@pytest.mark.parametrize("sampling, message", [
    ({"logprobs": 385}, "sampling.logprobs=385 exceeds the vocabulary size 384"),
    ({"stop_token_ids": [3, 384]},
     "sampling.stop_token_ids: 384 is outside the vocabulary [0, 384)"),
])
def test_job_wide_sampling_beyond_the_engine(run_refused, sampling, message):
    assert run_refused(sampling=sampling) == message


def test_values_at_the_engine_limits_run(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"), sampling={
        "max_new_tokens": 400, "logprobs": 384, "stop_token_ids": [0, 383]}))
    assert (result.exit_code, result.num_rows_ok) == (0, 5)


@pytest.mark.parametrize("max_new_tokens", [512, 100000])
def test_max_new_tokens_beyond_the_context_runs(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env, max_new_tokens):
    # Generation stops at max_model_len (finish_reason "length"), as in vLLM's offline
    # LLM.generate; these were job errors ('leaves no room for a prompt').
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"),
                                     sampling={"max_new_tokens": max_new_tokens}))
    assert (result.exit_code, result.num_rows_ok) == (0, 5)


def test_per_row_values_beyond_the_engine_stay_row_errors(tmp_path, tiny_tokenizer_dir, jobkit,
                                                          fake_engine_env):
    import pyarrow.parquet as pq

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3, seed=1,
                               max_new_tokens=[None, 100000, None],
                               stop_token_ids=[None, None, [5, 9999]])
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"), sampling={
        "per_row": ["max_new_tokens", "stop_token_ids"]}))
    assert (result.exit_code, result.num_rows_ok, result.num_rows_error) == (3, 2, 1)
    rows = pq.read_table(result.part_paths[0]).to_pylist()
    # max_new_tokens beyond the context is no error: the row stops at max_model_len.
    assert [r["error"] for r in rows] == [
        None, None, "stop_token_ids: 9999 is outside the vocabulary [0, 384)"]


def test_job_wide_values_that_every_row_overrides_are_not_checked(tmp_path, tiny_tokenizer_dir,
                                                                  jobkit, fake_engine_env):
    # per_row logprobs: the job-wide value is only a fallback, so it is no job error when
    # every row brings its own.
    import pyarrow.parquet as pq

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3, seed=1, logprobs=[1, 2, 3])
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"), sampling={
        "logprobs": 385, "per_row": ["logprobs"]}))
    assert (result.exit_code, result.num_rows_ok, result.num_rows_error) == (0, 3, 0)
    rows = pq.read_table(result.part_paths[0]).to_pylist()
    assert [len(r["logprobs"][0]["top"]) for r in rows] == [1, 2, 3]
