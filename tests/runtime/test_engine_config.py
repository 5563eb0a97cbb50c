"""EngineConfig refuses what the runtime cannot honour: at construction (no torch) or, for what
needs the model or the device, when the model runner resolves them (before any weight loads).
A max_model_len longer than the model's is used as the model's, with a warning."""

import pytest

from llmbatch.runtime.config import EngineConfig, EngineConfigError
from tests.runtime.tiny_models import new_engine


@pytest.mark.parametrize("value", [1, 0, -3, True, 2.5])
def test_max_model_len_below_two_or_not_an_integer_is_refused(value):
    # 1 too: no room for an output token after a one-token prompt (every request an error).
    with pytest.raises(ValueError) as info:
        EngineConfig(model="m", max_model_len=value)
    assert str(info.value) == (f"max_model_len must be an integer >= 2 (a prompt token and an "
                               f"output token) or null (the model's max_position_embeddings), "
                               f"got {value!r}")
    assert EngineConfig(model="m", max_model_len=2).max_model_len == 2


def test_resolve_max_model_len():
    # Longer than the model: the model's own (as before e2a439a; folders written with such a
    # value must resume), and ModelRunner warns.
    assert EngineConfig(model="m").resolve_max_model_len(512) == 512
    assert EngineConfig(model="m", max_model_len=512).resolve_max_model_len(512) == 512
    assert EngineConfig(model="m", max_model_len=40).resolve_max_model_len(512) == 40
    assert EngineConfig(model="m", max_model_len=100000).resolve_max_model_len(512) == 512


def test_engine_uses_the_model_length_when_longer_and_warns(llama_setup, caplog):
    caplog.set_level("WARNING", logger="llmbatch")
    assert new_engine(llama_setup, max_model_len=513).max_model_len == 512
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("llmbatch.runtime.model_runner", "WARNING",
         f"max_model_len 513 is larger than the max_position_embeddings (512) of model "
         f"{llama_setup[0]}; using 512")]
    caplog.clear()
    assert new_engine(llama_setup, max_model_len=512).max_model_len == 512
    assert caplog.records == []


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
