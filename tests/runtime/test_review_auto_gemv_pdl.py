"""Review of 6a62a8a (skinny_gemv and pdl default to auto, None): what the auto options do with
values that are not true / false / null, and PDL's auto-on where Triton cannot launch with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import enable_kernel_paths
from llmbatch.runtime.layers.norm import RMSNorm


@pytest.mark.parametrize("name,value", [("skinny_gemv", 0), ("pdl", 0), ("skinny_gemv", "false"),
                                        ("pdl", "no"), ("pdl", 1)])
def test_auto_options_refuse_values_other_than_true_false_none(name, value):
    """The auto check is `value is not False`: 0 or "false" from the Python API turned the path
    ON while reading as off. EngineConfig refuses them as it validates its other settings."""
    with pytest.raises(ValueError) as err:
        EngineConfig(model="m", **{name: value})
    assert str(err.value) == f"{name} must be true, false or null (auto), got {value!r}"


@pytest.mark.parametrize("value", [None, True, False])
def test_auto_options_take_true_false_none(value):
    config = EngineConfig(model="m", skinny_gemv=value, pdl=value)
    assert (config.skinny_gemv, config.pdl) == (value, value)


def _no_launch_pdl_option(monkeypatch):
    """A Triton whose CUDA backend has no launch_pdl option (its launcher then raises
    "Keyword argument launch_pdl was specified but unrecognised" at every PDL launch)."""
    from triton.backends.nvidia import compiler

    fields = [(f.name, f.type, f) for f in dataclasses.fields(compiler.CUDAOptions)
              if f.name != "launch_pdl"]
    monkeypatch.setattr(compiler, "CUDAOptions",
                        dataclasses.make_dataclass("CUDAOptions", fields, frozen=True))


def _no_gdc_wait(monkeypatch):
    """A Triton without tl.extra.cuda.gdc_wait (runtime/pdl.py's kernels fail to compile)."""
    import triton.language as tl

    monkeypatch.delattr(tl.extra.cuda, "gdc_wait")


@pytest.mark.parametrize("older_triton", [_no_launch_pdl_option, _no_gdc_wait])
def test_pdl_auto_stays_off_on_sm90_when_triton_cannot_launch_with_it(monkeypatch, caplog,
                                                                       older_triton):
    """pyproject allows triton>=3.0; PDL launches need Triton's launch_pdl option and
    gdc_wait / gdc_launch_dependents. Auto-on there made every fused kernel launch fail on an
    H100 / H200 with the default config. Auto: off, silently; True: off, logged with why."""
    pytest.importorskip("triton")
    from llmbatch.runtime import kernel_paths, pdl

    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    older_triton(monkeypatch)
    try:
        with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
            auto = enable_kernel_paths(nn.Sequential(RMSNorm(8)), EngineConfig(model="m"),
                                       torch.device("cuda"), 1, "none")
            assert (auto.pdl, pdl.enabled()) == (False, False)
            assert caplog.records == []
            asked = enable_kernel_paths(nn.Sequential(RMSNorm(8)),
                                        EngineConfig(model="m", pdl=True),
                                        torch.device("cuda"), 1, "none")
        assert (asked.pdl, pdl.enabled()) == (False, False)
        assert [r.getMessage() for r in caplog.records] == [
            "pdl ignored: this Triton cannot launch with programmatic dependent launch "
            "(no launch_pdl option or tl.extra.cuda.gdc_wait; a newer Triton has them)"]
    finally:
        pdl.set_enabled(False)   # process-wide: never leak into other tests


def test_pdl_auto_on_with_sm90_and_this_triton(monkeypatch):
    """The installed Triton (3.3+) has both: auto PDL stays on at sm_90 (no regression)."""
    pytest.importorskip("triton")
    from llmbatch.runtime import kernel_paths, pdl

    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    try:
        on = enable_kernel_paths(nn.Sequential(RMSNorm(8)), EngineConfig(model="m"),
                                 torch.device("cuda"), 1, "none")
        assert (on.pdl, pdl.enabled()) == (True, True)
    finally:
        pdl.set_enabled(False)
