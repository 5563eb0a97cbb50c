"""Stop 19 made two measured options auto (None): rotary_in_attention (on where the triton
backend and the fused rotary are) and gemv_weight_prefetch ("tile" where the gemv layers and
PDL are on). Auto applies silently where it can and stays off silently where it cannot; an
explicit value keeps its old behaviour (applied, or logged as ignored)."""

from __future__ import annotations

import types

import pytest
import torch

from llmbatch.runtime.config import EngineConfig


@pytest.mark.parametrize("value", [0, "false", 1, "on"])
def test_rotary_in_attention_refuses_values_other_than_true_false_none(value):
    with pytest.raises(ValueError) as err:
        EngineConfig(model="m", rotary_in_attention=value)
    assert str(err.value) == \
        f"rotary_in_attention must be true, false or null (auto), got {value!r}"


def test_defaults_are_auto_and_bad_prefetch_modes_are_refused():
    config = EngineConfig(model="m")
    assert (config.rotary_in_attention, config.gemv_weight_prefetch) == (None, None)
    with pytest.raises(ValueError, match="gemv_weight_prefetch='fast' is not one of"):
        EngineConfig(model="m", gemv_weight_prefetch="fast")


@pytest.fixture
def tiny_llama(tmp_path):
    pytest.importorskip("triton")
    from tests.runtime.test_models import load_ours, make_hf_model

    return load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)


@pytest.mark.parametrize("sm90,asked,expected", [
    (True, None, "tile"),      # auto with PDL: the measured default
    (False, None, "off"),      # auto without PDL: nothing to overlap
    (True, "off", "off"),
    (False, "tile", "tile"),   # explicit: applied with or without PDL, as before
    (True, "both", "both"),
])
def test_gemv_weight_prefetch_auto_follows_pdl(tiny_llama, monkeypatch, caplog, sm90, asked,
                                               expected):
    """The CUDA branch on CPU tensors (the gemv layers turn on; the device capability is
    faked where PDL should be on, and the start-up check, which would launch PDL kernels on
    CPU tensors, passes: it records the prefetch mode it was asked to check)."""
    from llmbatch.runtime import kernel_paths, pdl
    from llmbatch.runtime.layers import gemv
    from llmbatch.runtime.models import gemv_check

    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability",
                        lambda d=None: (9, 0) if sm90 else (8, 0))
    checked = []
    monkeypatch.setattr(gemv_check, "gemv_rows_after_check",
                        lambda model, skinny, pdl, mode, rows: (checked.append(mode) or rows,
                                                                None))
    try:
        with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
            paths = kernel_paths.enable_kernel_paths(
                tiny_llama, EngineConfig(model="m", gemv_weight_prefetch=asked),
                torch.device("cuda"), 1, "none")
        assert (paths.skinny_gemv, paths.pdl) == (True, sm90)
        assert (paths.gemv_weight_prefetch, gemv.prefetch_mode()) == (expected, expected)
        assert checked == [expected]   # the check launched the kernels the engine will
        assert not [r for r in caplog.records if "ignored" in r.getMessage()]
    finally:
        pdl.set_enabled(False)
        gemv.set_prefetch_mode("off")


@pytest.mark.parametrize("asked,logged", [(None, False), ("tile", True)])
def test_gemv_weight_prefetch_without_the_gemv_layers(tiny_llama, monkeypatch, caplog, asked,
                                                      logged):
    """skinny_gemv off: auto stays off without a word; an explicit mode is logged as ignored."""
    from llmbatch.runtime import kernel_paths, pdl
    from llmbatch.runtime.layers import gemv

    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    try:
        with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
            paths = kernel_paths.enable_kernel_paths(
                tiny_llama, EngineConfig(model="m", skinny_gemv=False,
                                         gemv_weight_prefetch=asked),
                torch.device("cuda"), 1, "none")
        assert (paths.skinny_gemv, paths.gemv_weight_prefetch, gemv.prefetch_mode()) == \
            (False, "off", "off")
        messages = [r.getMessage() for r in caplog.records]
        assert ("gemv_weight_prefetch ignored: the gemv layers are off" in messages) is logged
    finally:
        pdl.set_enabled(False)
        gemv.set_prefetch_mode("off")


def _runner_stub(model, backend_name: str, asked):
    from llmbatch.runtime.attention import get_attention_backend

    return types.SimpleNamespace(config=EngineConfig(model="m", rotary_in_attention=asked),
                                 attn_backend=get_attention_backend(backend_name, "cuda"),
                                 model=model)


@pytest.mark.parametrize("asked,fused,backend,on,logged", [
    (None, True, "triton", True, False),    # auto where it applies: on
    (None, False, "triton", False, False),  # auto without the fused rotary: off, silently
    (None, True, "torch", False, False),
    (True, False, "triton", False, True),   # asked where it cannot apply: logged
    (False, True, "triton", False, False),  # turned off
])
def test_rotary_in_attention_auto(tiny_llama, caplog, asked, fused, backend, on, logged):
    from llmbatch.runtime.model_runner import ModelRunner
    from llmbatch.runtime.models.llama import LlamaAttention

    for m in tiny_llama.modules():
        if isinstance(m, LlamaAttention):
            m.use_fused_rotary = fused
    runner = _runner_stub(tiny_llama, backend, asked)
    with caplog.at_level("INFO", logger="llmbatch.runtime.model_runner"):
        assert ModelRunner._enable_rotary_in_attention(runner) is on
    assert getattr(runner.attn_backend, "rotary_in_attention", False) is on
    messages = [r.getMessage() for r in caplog.records]
    assert any("rotary_in_attention ignored" in m for m in messages) is logged
