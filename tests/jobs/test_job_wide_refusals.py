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
