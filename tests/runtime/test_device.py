"""runtime/device.py on CPU: device and dtype resolution, and make_current (an indexed CUDA
device becomes the current one, so Triton kernels launch where the tensors live)."""

from __future__ import annotations

import pytest
import torch

from llmbatch.runtime.device import make_current, resolve_device, resolve_dtype


def test_make_current_sets_only_an_indexed_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    make_current(torch.device("cpu"))
    make_current(torch.device("cuda"))          # "cuda": whatever is current stays current
    make_current(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_resolve_device_and_dtype_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="is not supported"):
        resolve_device("meta")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
