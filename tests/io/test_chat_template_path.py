"""model.chat_template naming a directory: a README check got "file not found: data" for a
folder that exists."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


def test_a_chat_template_that_is_a_directory_is_named_as_one(tmp_path, jobkit,
                                                             tiny_tokenizer_dir, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"),
                          model={"chat_template": str(tmp_path)})
    with pytest.raises(InvalidJobError) as info:
        run_job(job)
    assert info.value.message == (f"model.chat_template: {tmp_path} is a directory, not a "
                                  f"Jinja template file (use auto, none or a path to a Jinja "
                                  f"template)")
