"""model.path, model.tokenizer and input.dataset judge 'local path or Hub id?' by one rule
(llmbatch/hub_names.py). Before, model keys took 'models/tiny' (with ./models there) and
'my model' for Hub ids and waited on the Hub, while input.dataset said at once that the local
path was missing."""

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.path_checks import check_local_path
from llmbatch.runtime.loader import resolve_model_path

MISTYPED_LOCAL = ["./missing", "/nowhere/model", "~/no-such-llmbatch-model", "a/b/c", "a//b",
                  "models/tiny", "my model"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()   # 'models/tiny': its folder exists, so a local typo
    return tmp_path


@pytest.mark.parametrize("name", MISTYPED_LOCAL)
def test_job_check_refuses_a_missing_local_path(in_tmp, name):
    with pytest.raises(InvalidJobError) as info:
        check_local_path("model.path", name)
    assert info.value.message == f"model.path: {name} does not exist"


@pytest.mark.parametrize("name", MISTYPED_LOCAL)
def test_loader_refuses_the_same_names_without_the_hub(in_tmp, monkeypatch, name):
    import huggingface_hub

    def refuse(*args, **kwargs):  # pragma: no cover - reached only by a regression
        raise AssertionError("snapshot_download was called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(name)


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.2-1B", "gpt2", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_and_existing_paths_pass_the_job_check(in_tmp, name):
    check_local_path("model.path", name)               # left to the loader
    check_local_path("model.path", str(in_tmp / "models"))
