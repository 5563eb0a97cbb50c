import pytest
import torch

from tests.runtime.tiny_models import make_model, make_tokenizer


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    """(model dir, tokenizer) of a tiny random Llama whose EOS id is 2."""
    path = tmp_path_factory.mktemp("m")
    tok = make_tokenizer(tmp_path_factory.mktemp("t"))
    make_model(path, arch="llama", eos_token_id=2)
    return path, tok


@pytest.fixture
def poisoned_empty(monkeypatch):
    """For the test, torch.empty / empty_like (the Triton launchers' output buffers and
    workspaces; patched on the torch module, so globally) return NaN-filled memory: an element
    a kernel fails to write stays NaN and fails the comparison (checked by masking one column
    out of a kernel). Shared by the kernel tests of this directory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    def empty_like(*args, **kwargs):
        return real_empty_like(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
