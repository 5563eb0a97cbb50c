import pytest

from tests.runtime.tiny_models import make_model, make_tokenizer


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    """(model dir, tokenizer) of a tiny random Llama whose EOS id is 2."""
    path = tmp_path_factory.mktemp("m")
    tok = make_tokenizer(tmp_path_factory.mktemp("t"))
    make_model(path, arch="llama", eos_token_id=2)
    return path, tok
