"""runtime/pdl.py: the process-wide PDL switch, set by kernel_paths per engine (on only for
EngineConfig.pdl True or None (auto) on sm_90+ CUDA with fused kernels; every other engine turns it off), and read
by every PDL-capable launcher (fused kernels, rotary, attention, split reduce). The kernels'
PDL path itself needs a GPU (tests/gpu, bench_batch1's row); bench/compile_kernels.py
compiles it for sm_90."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from llmbatch.runtime import pdl
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import enable_kernel_paths


@pytest.fixture(autouse=True)
def _pdl_off_after():
    yield
    pdl.set_enabled(False)


def test_launch_kwargs_only_when_on_and_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pdl.launch_kwargs(cuda) == {} and not pdl.enabled()
    pdl.set_enabled(True)
    assert pdl.launch_kwargs(cuda) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.launch_kwargs(cpu) == {}


def test_kernel_paths_set_the_switch_per_engine(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    model = nn.Sequential()
    paths = enable_kernel_paths(model, EngineConfig(model="m", pdl=True), cuda, 1, "none")
    assert paths.pdl is True and pdl.enabled()
    # The next engine without pdl (or on an older card, or on CPU) turns it off again.
    assert enable_kernel_paths(model, EngineConfig(model="m", pdl=False), cuda, 1,
                               "none").pdl is False
    assert not pdl.enabled()
    enable_kernel_paths(model, EngineConfig(model="m", pdl=True), cuda, 1, "none")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert enable_kernel_paths(model, EngineConfig(model="m", pdl=True), cuda, 1,
                               "none").pdl is False
    assert not pdl.enabled()
    pdl.set_enabled(True)
    enable_kernel_paths(model, EngineConfig(model="m", pdl=True), torch.device("cpu"), 1, "none")
    assert not pdl.enabled()


def test_every_pdl_capable_launcher_asks_the_switch(monkeypatch, tmp_path):
    """A decode-like step of the fused path (RMSNorm, rotary + K/V store, split attention and
    its reduce, SiLU·mul) under the interpreter: each launcher asks launch_kwargs for its
    tensors' device (CPU here, so PDL stays off and the kernels run as always)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels on CPU tensors need TRITON_INTERPRET=1")
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.layers import fused_kernels as fk
    from tests.runtime.test_triton_attention import make_case

    callers = []
    real = pdl.launch_kwargs

    def recording(device):
        callers.append((inspect.stack()[1].function, device))
        return real(device)

    monkeypatch.setattr(pdl, "launch_kwargs", recording)
    x = torch.randn(2, 64)
    fk.fused_rms_norm(x, torch.ones(64), 1e-5)
    fk.fused_silu_and_mul(torch.randn(2, 128))
    case = make_case([(40, 1), (20, 1)], 4, 2, 32, 16, torch.float32)
    TritonAttentionBackend(num_kv_splits=2).forward(case.query, case.k_cache, case.v_cache,
                                                    case.meta, 0.1)
    from llmbatch.runtime.layers.fused_rotary import fused_rotary_store_kv

    q = torch.randn(3, 4, 32)
    kv = torch.randn(3, 2, 32)
    cos = sin = torch.ones(3, 1, 16)
    cache = torch.zeros(2, 16, 2, 32)
    fused_rotary_store_kv(q, kv, kv, cos, sin, cache, cache.clone(), torch.arange(3))
    # The one-launch decode attention (rotary_in_attention) and its split reduce.
    TritonAttentionBackend(num_kv_splits=2).forward_rotary_decode(
        case.query, case.key, case.value, cos[:2], sin[:2], case.k_cache, case.v_cache,
        case.meta, 0.1)
    assert [c for c, _ in callers] == ["fused_rms_norm", "fused_silu_and_mul", "paged_attention",
                                       "reduce_splits", "fused_rotary_store_kv",
                                       "rotary_decode_attention", "reduce_splits"]
    assert {d for _, d in callers} == {torch.device("cpu")}
