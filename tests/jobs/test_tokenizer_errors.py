"""A tokenizer that cannot be loaded is reported under the key that names it. A README check
found `model.tokenizer: nope` (a Hub-id spelling, no Hub) blamed on model.path after a minute
of transformers' retries logged to stderr, and a `model.tokenizer` folder without tokenizer
files reported as "model.path ...: cannot load the model: Couldn't instantiate the backend
tokenizer from one of:" (the reason cut at its first line)."""

import time

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


def test_a_hub_tokenizer_that_cannot_be_fetched_names_model_tokenizer(tmp_path, jobkit,
                                                                      tiny_tokenizer_dir,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"),
                          model={"tokenizer": "no-such-org/no-such-tokenizer"})
    start = time.monotonic()
    with pytest.raises(InvalidJobError) as info:
        run_job(job, engine_factory=lambda config: pytest.fail("engine built"))
    assert time.monotonic() - start < 10
    assert info.value.message.startswith("model.tokenizer no-such-org/no-such-tokenizer: cannot "
                                         "load the tokenizer: ")
    assert "\n" not in info.value.message
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_folder_without_tokenizer_files_names_model_tokenizer(tmp_path, jobkit,
                                                                         tiny_llama_dir):
    (tmp_path / "empty-tok").mkdir()
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                          model={"tokenizer": str(tmp_path / "empty-tok")})
    with pytest.raises(InvalidJobError) as info:
        run_job(job)
    message = info.value.message
    assert message.startswith(f"model.tokenizer {tmp_path / 'empty-tok'}: cannot load the "
                              f"tokenizer: "), message
    assert "\n" not in message and not message.endswith(":"), message
    assert not (tmp_path / "out").exists()
