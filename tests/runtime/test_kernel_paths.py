"""runtime/kernel_paths.py: options that cannot apply are ignored, and the engine says so.

Here: fused kernels, skinny matmul and the gemv layers, PDL, the L2 / weight prefetch, draft
runners. The quantized GEMMs' start-up check and rank agreement: test_kernel_paths_quant.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import KernelPaths, enable_kernel_paths
from llmbatch.runtime.layers.norm import RMSNorm


def test_cpu_takes_no_triton_path_whatever_the_config_asks():
    model = nn.Sequential(RMSNorm(8))
    config = EngineConfig(model="m", fused_kernels=True, skinny_matmul=True, pdl=True,
                          l2_prefetch=True)
    assert enable_kernel_paths(model, config, torch.device("cpu"), 1, "none") == KernelPaths()
    assert model[0].use_fused_kernel is False
    off = EngineConfig(model="m", fused_kernels=False, skinny_matmul=True)
    assert enable_kernel_paths(model, off, torch.device("cpu"), 1, "none") == KernelPaths()


def test_options_needing_fused_kernels_are_ignored_with_a_log(caplog):
    off = EngineConfig(model="m", fused_kernels=False, skinny_matmul=True, pdl=True)
    with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
        assert enable_kernel_paths(nn.Sequential(), off, torch.device("cuda"), 1,
                                   "none") == KernelPaths()
        # the auto options (skinny_gemv, pdl at None) are not named: nobody asked for them
        assert enable_kernel_paths(nn.Sequential(), EngineConfig(model="m", fused_kernels=False),
                                   torch.device("cuda"), 1, "none") == KernelPaths()
    assert [r.getMessage() for r in caplog.records] == [
        "skinny_matmul and pdl ignored: needs fused_kernels"]


def test_l2_prefetch_on_cuda_unless_skinny_matmul_is_on(tmp_path, monkeypatch, caplog):
    """The CUDA branch on CPU tensors, with the side stream replaced by a CPU prefetcher:
    l2_prefetch installs 2 touches a layer; with skinny_matmul (its own layer forward) it is
    ignored with a log."""
    pytest.importorskip("triton")
    from llmbatch.runtime.layers.l2_prefetch import L2Prefetcher
    from llmbatch.runtime.models import llama_prefetch
    from tests.runtime.test_models import load_ours, make_hf_model

    monkeypatch.setattr(llama_prefetch, "L2Prefetcher",
                        lambda device: L2Prefetcher(torch.device("cpu")))
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    config = EngineConfig(model="m", l2_prefetch=True)
    paths = enable_kernel_paths(model, config, torch.device("cuda"), 1, "none")
    assert (paths.fused_kernels, paths.l2_prefetch_weights) == (True, 4)
    assert model.model.l2_prefetcher is not None
    llama_prefetch.disable_l2_prefetch(model)
    both = EngineConfig(model="m", l2_prefetch=True, skinny_matmul=True)
    with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
        paths = enable_kernel_paths(model, both, torch.device("cuda"), 1, "none")
    assert (paths.skinny_matmul, paths.l2_prefetch_weights) == (True, 0)
    assert model.model.l2_prefetcher is None
    assert "l2_prefetch ignored: the skinny layers are on (one or the other)" in [
        r.getMessage() for r in caplog.records]


def test_skinny_gemv_is_on_by_default_for_one_token_steps(tmp_path, caplog):
    """The CUDA branch on CPU tensors: with the defaults (skinny_gemv None = auto), one-token
    steps take the gemv layers (zeroed counters, skinny_max_tokens 1) and steps of 2+ tokens
    stay unfused; with skinny_matmul too, steps up to 16 tokens fuse. PDL stays off where the
    device reports no sm_90 (here: no CUDA at all), silently since nobody asked for it."""
    pytest.importorskip("triton")
    from tests.runtime.test_models import load_ours, make_hf_model

    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    inner = model.model
    with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
        paths = enable_kernel_paths(model, EngineConfig(model="m"), torch.device("cuda"), 1,
                                    "none")
    assert (paths.skinny_matmul, paths.skinny_gemv, paths.skinny_pdl, paths.pdl) == \
        (False, True, False, False)
    assert (inner.use_skinny_matmul, inner.skinny_max_tokens) == (True, 1)
    assert int(inner.skinny_gemv_counters.abs().sum()) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "skinny_gemv on: one-token steps on the one-row gemv kernels"]
    both = EngineConfig(model="m", skinny_matmul=True)
    paths = enable_kernel_paths(model, both, torch.device("cuda"), 1, "none")
    assert (paths.skinny_matmul, paths.skinny_gemv, inner.skinny_max_tokens) == (True, True, 16)
    alone = EngineConfig(model="m", skinny_matmul=True, skinny_gemv=False)
    paths = enable_kernel_paths(model, alone, torch.device("cuda"), 1, "none")
    assert (paths.skinny_matmul, paths.skinny_gemv, inner.skinny_gemv_counters) == \
        (True, False, None)


def test_skinny_gemv_off_explicitly_or_where_it_cannot_apply(tmp_path, caplog):
    pytest.importorskip("triton")
    from llmbatch.runtime.models import llama_skinny
    from tests.runtime.test_models import load_ours, make_hf_model

    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    off = EngineConfig(model="m", skinny_gemv=False)
    assert enable_kernel_paths(model, off, torch.device("cuda"), 1, "none").skinny_gemv is False
    assert model.model.use_skinny_matmul is False
    with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
        auto_tp2 = enable_kernel_paths(model, EngineConfig(model="m"), torch.device("cuda"), 2,
                                       "none")
        assert caplog.records == []          # auto: silent where it cannot apply
        asked = EngineConfig(model="m", skinny_gemv=True)
        asked_nf4 = enable_kernel_paths(model, asked, torch.device("cuda"), 1, "nf4")
    assert (auto_tp2.skinny_gemv, asked_nf4.skinny_gemv) == (False, False)
    assert [r.getMessage() for r in caplog.records] == [
        "skinny_gemv ignored: needs tensor_parallel_size 1, unquantized weights and a "
        "Llama-family model"]
    with pytest.raises(ValueError, match="small_steps=False needs gemv_rows=True"):
        llama_skinny.enable_skinny_matmul(model, small_steps=False)


def test_pdl_is_on_by_default_on_sm90_and_can_be_turned_off(monkeypatch, caplog):
    from llmbatch.runtime import kernel_paths, pdl

    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    try:
        on = enable_kernel_paths(nn.Sequential(RMSNorm(8)), EngineConfig(model="m"),
                                 torch.device("cuda"), 1, "none")
        assert (on.pdl, pdl.enabled()) == (True, True)
        off = enable_kernel_paths(nn.Sequential(RMSNorm(8)), EngineConfig(model="m", pdl=False),
                                  torch.device("cuda"), 1, "none")
        assert (off.pdl, pdl.enabled()) == (False, False)
        monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability",
                            lambda d=None: (8, 0))
        with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
            auto = enable_kernel_paths(nn.Sequential(RMSNorm(8)), EngineConfig(model="m"),
                                       torch.device("cuda"), 1, "none")
            assert caplog.records == []      # auto on an A100: off, silently
            asked = enable_kernel_paths(nn.Sequential(RMSNorm(8)),
                                        EngineConfig(model="m", pdl=True),
                                        torch.device("cuda"), 1, "none")
        assert (auto.pdl, asked.pdl, pdl.enabled()) == (False, False, False)
        assert [r.getMessage() for r in caplog.records] == [
            "pdl ignored: programmatic dependent launch needs sm_90 or newer"]
    finally:
        pdl.set_enabled(False)   # process-wide: never leak into other tests


@pytest.mark.parametrize("mode,tile,l2", [("tile", True, False), ("l2", False, True),
                                           ("both", True, True)])
def test_gemv_weight_prefetch_rides_on_the_gemv_layers_and_never_leaks(mode, tile, l2, tmp_path,
                                                                       caplog):
    """The CUDA branch on CPU tensors: gemv_weight_prefetch sets gemv's process-wide switches
    only where the gemv layers are on; the next engine (any config, any device) resets them."""
    pytest.importorskip("triton")
    from llmbatch.runtime.layers import gemv
    from tests.runtime.test_models import load_ours, make_hf_model

    def switches():
        return gemv.weight_prefetch_enabled(), gemv.weight_prefetch_l2_enabled()

    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    cuda = torch.device("cuda")
    try:
        on = enable_kernel_paths(model, EngineConfig(model="m", gemv_weight_prefetch=mode),
                                 cuda, 1, "none")
        assert (on.skinny_gemv, on.gemv_weight_prefetch, switches()) == (True, mode, (tile, l2))
        enable_kernel_paths(model, EngineConfig(model="m"), torch.device("cpu"), 1, "none")
        assert switches() == (False, False)
        no_gemv = EngineConfig(model="m", skinny_gemv=False, gemv_weight_prefetch=mode)
        with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
            off = enable_kernel_paths(model, no_gemv, cuda, 1, "none")
        assert (off.gemv_weight_prefetch, switches()) == ("off", (False, False))
        assert "gemv_weight_prefetch ignored: the gemv layers are off" in [
            r.getMessage() for r in caplog.records]
    finally:
        gemv.set_weight_prefetch(False)
        gemv.set_weight_prefetch_l2(False)


def test_a_draft_runner_leaves_the_engines_gemv_prefetch_on(tmp_path):
    """The CUDA branch on CPU tensors: the target's runner sets gemv_weight_prefetch's
    process-wide switch; a draft runner (inheriting_process_switches, as draft_proposer.py
    builds it) that the gemv layers do not apply to leaves it on, and reports it off for
    itself. It used to reset the switches and turn the target's prefetch off."""
    pytest.importorskip("triton")
    from llmbatch.runtime.kernel_paths import inheriting_process_switches
    from llmbatch.runtime.layers import gemv
    from tests.runtime.test_models import load_ours, make_hf_model

    target = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    config = EngineConfig(model="m", gemv_weight_prefetch="tile")
    cuda = torch.device("cuda")
    try:
        on = enable_kernel_paths(target, config, cuda, 1, "none")
        assert (on.skinny_gemv, on.gemv_weight_prefetch) == (True, "tile")
        with inheriting_process_switches():
            draft = enable_kernel_paths(nn.Sequential(RMSNorm(8)), config, cuda, 1, "none")
        assert (draft.fused_kernels, draft.skinny_gemv, draft.gemv_weight_prefetch) == \
            (True, False, "off")
        assert (gemv.weight_prefetch_enabled(), gemv.weight_prefetch_l2_enabled()) == \
            (True, False)
    finally:
        gemv.set_weight_prefetch(False)
        gemv.set_weight_prefetch_l2(False)


def test_a_draft_runner_runs_with_the_engines_switches(tmp_path, monkeypatch):
    """The CUDA branch on CPU tensors, sm_90 faked: a draft runner neither sets PDL nor its
    config's weight prefetch; its gemv layers (and their start-up check) take the switches the
    engine left (here: PDL off, the L2 prefetch on), and it reports those."""
    pytest.importorskip("triton")
    from llmbatch.runtime import kernel_paths, pdl
    from llmbatch.runtime.layers import gemv
    from llmbatch.runtime.models import gemv_check
    from tests.runtime.test_models import load_ours, make_hf_model

    def switches():
        return pdl.enabled(), gemv.weight_prefetch_enabled(), gemv.weight_prefetch_l2_enabled()

    checked = []
    real_check = gemv_check.check_gemv_layers
    monkeypatch.setattr(gemv_check, "check_gemv_layers",
                        lambda model, *a: checked.append(switches()) or real_check(model, *a))
    monkeypatch.setattr(kernel_paths.torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    draft = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    config = EngineConfig(model="m", gemv_weight_prefetch="tile")   # pdl auto: on at sm_90
    try:
        gemv.set_weight_prefetch_l2(True)
        with kernel_paths.inheriting_process_switches():
            paths = enable_kernel_paths(draft, config, torch.device("cuda"), 1, "none")
        assert (paths.skinny_gemv, paths.gemv_weight_prefetch, paths.pdl, paths.skinny_pdl) == \
            (True, "l2", False, False)
        assert draft.model.skinny_pdl is False
        assert checked == [(False, False, True)] and switches() == (False, False, True)
    finally:
        pdl.set_enabled(False)
        gemv.set_weight_prefetch(False)
        gemv.set_weight_prefetch_l2(False)


def test_gemv_weight_prefetch_refuses_unknown_modes():
    with pytest.raises(ValueError, match=r"gemv_weight_prefetch=True is not one of off, tile, "
                                         r"l2, both"):
        EngineConfig(model="m", gemv_weight_prefetch=True)


def test_explicit_l2_prefetch_turns_the_auto_gemv_off(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from llmbatch.runtime.layers.l2_prefetch import L2Prefetcher
    from llmbatch.runtime.models import llama_prefetch
    from tests.runtime.test_models import load_ours, make_hf_model

    monkeypatch.setattr(llama_prefetch, "L2Prefetcher",
                        lambda device: L2Prefetcher(torch.device("cpu")))
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    paths = enable_kernel_paths(model, EngineConfig(model="m", l2_prefetch=True),
                                torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.l2_prefetch_weights) == (False, 4)
    assert model.model.use_skinny_matmul is False


def test_engine_stats_report_the_paths_taken(llama_setup):
    from tests.runtime.tiny_models import new_engine

    stats = new_engine(llama_setup, skinny_matmul=True).stats()
    assert (stats["fused_kernels_active"], stats["skinny_matmul_active"],
            stats["skinny_pdl_active"], stats["skinny_gemv_active"],
            stats["int8_triton_layers"], stats["int8_triton_error"],
            stats["l2_prefetch_weights"]) == (False, False, False, False, 0, None, 0)
