"""EngineConfig refuses what the runtime cannot honour: at construction (no torch) or, for what
needs the model or the device, when the model runner resolves them (before any weight loads)."""

import pytest

from llmbatch.runtime.config import EngineConfig, EngineConfigError
from tests.runtime.tiny_models import new_engine


@pytest.mark.parametrize("value", [0, -3, True, 2.5])
def test_max_model_len_below_one_or_not_an_integer_is_refused(value):
    with pytest.raises(ValueError) as info:
        EngineConfig(model="m", max_model_len=value)
    assert str(info.value) == (f"max_model_len must be an integer >= 1 or null (the model's "
                               f"max_position_embeddings), got {value!r}")


def test_resolve_max_model_len():
    assert EngineConfig(model="m").resolve_max_model_len(512, "m") == 512
    assert EngineConfig(model="m", max_model_len=512).resolve_max_model_len(512, "m") == 512
    assert EngineConfig(model="m", max_model_len=40).resolve_max_model_len(512, "m") == 40
    with pytest.raises(EngineConfigError) as info:
        EngineConfig(model="m", max_model_len=100000).resolve_max_model_len(512, "dir/m")
    assert str(info.value) == ("max_model_len=100000 is larger than the "
                               "max_position_embeddings (512) of model dir/m")


def test_engine_refuses_a_context_longer_than_the_model(llama_setup):
    with pytest.raises(EngineConfigError) as info:     # a ValueError too, for API users
        new_engine(llama_setup, max_model_len=513)
    assert str(info.value).startswith("max_model_len=513 is larger than the "
                                      "max_position_embeddings (512) of model ")
    assert new_engine(llama_setup, max_model_len=512).max_model_len == 512


def test_triton_backend_needs_cuda_unless_interpreted(monkeypatch):
    config = EngineConfig(model="m", attention_backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EngineConfigError) as info:
        config.check_device("cpu")
    assert str(info.value) == ("attention_backend='triton' needs a CUDA device, the engine "
                               "runs on cpu; use auto or torch")
    config.check_device("cuda")
    EngineConfig(model="m", attention_backend="auto").check_device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the CPU tests' interpreter: allowed
    config.check_device("cpu")


def test_engine_refuses_triton_on_cpu_before_loading(llama_setup, monkeypatch):
    import llmbatch.runtime.loader as loader

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(loader, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(EngineConfigError, match="needs a CUDA device"):
        new_engine(llama_setup, attention_backend="triton")
