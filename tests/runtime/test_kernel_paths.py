"""runtime/kernel_paths.py: options that cannot apply are ignored, and the engine says so."""

from __future__ import annotations

import torch
from torch import nn

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import KernelPaths, enable_kernel_paths
from llmbatch.runtime.layers.norm import RMSNorm


def test_cpu_takes_no_triton_path_whatever_the_config_asks():
    model = nn.Sequential(RMSNorm(8))
    config = EngineConfig(model="m", fused_kernels=True, skinny_matmul=True, pdl=True)
    assert enable_kernel_paths(model, config, torch.device("cpu"), 1, "none") == KernelPaths()
    assert model[0].use_fused_kernel is False
    off = EngineConfig(model="m", fused_kernels=False, skinny_matmul=True)
    assert enable_kernel_paths(model, off, torch.device("cpu"), 1, "none") == KernelPaths()


def test_engine_stats_report_the_paths_taken(llama_setup):
    from tests.runtime.tiny_models import new_engine

    stats = new_engine(llama_setup, skinny_matmul=True).stats()
    assert (stats["fused_kernels_active"], stats["skinny_matmul_active"],
            stats["skinny_pdl_active"], stats["int8_triton_layers"]) == (False, False, False, 0)
