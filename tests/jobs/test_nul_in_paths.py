"""A NUL character in a path key is one line naming the key (exit 2): input.path and
output.path raised "embedded null byte" from os.path (internal error, exit 1), and other
keys printed the raw NUL in their error line. Text keys (stop strings) may still hold one."""

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}


@pytest.mark.parametrize("section, key, value, where", [
    ("input", "path", "in\0.parquet", "input.path"),
    ("input", "path", ["a.parquet", "b\0.parquet"], "input.path[1]"),
    ("output", "path", "o\0x", "output.path"),
    ("model", "tokenizer", "t\0k", "model.tokenizer"),
    ("speculative", "draft_model", "d\0m", "speculative.draft_model"),
])
def test_a_nul_in_a_path_is_refused(section, key, value, where):
    job = {k: dict(v) for k, v in BASE.items()}
    job.setdefault(section, {})[key] = value
    with pytest.raises(InvalidJobError) as info:
        load_job(job)
    assert info.value.message.startswith(f"{where}: a path cannot hold a NUL character ")
    assert "\0" not in info.value.message


def test_a_nul_in_a_stop_string_is_text():
    spec = load_job(dict(BASE, sampling={"stop": ["a\0b"]}))
    assert spec.sampling.stop == ["a\0b"]
