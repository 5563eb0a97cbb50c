"""Which Triton kernel paths a loaded model takes, from EngineConfig and the device.

    fused_kernels   (default on)  RMSNorm, SiLU·mul, rotary (+ K/V store) as Triton kernels
                                  (layers/fused_kernels.py, layers/fused_rotary.py); and
                                  int8-quantized linear layers on the w8a16 GEMM
                                  (layers/int8_matmul.py) instead of dequantizing per call
    skinny_matmul   (opt-in)      steps of <= 16 tokens run 6-launch decoder layers
                                  (models/llama_skinny.py); tensor_parallel_size 1, dense
    pdl             (opt-in)      the skinny kernels use programmatic dependent launch (sm_90+)

All of them need CUDA: on the CPU the Triton interpreter would be far slower than torch, so the
options are ignored there (logged), as they are when they cannot apply. The switches are flags
on the model's modules, set once after loading and before CUDA graphs are captured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class KernelPaths:
    """What applied (engine.stats() reports it: options are silently moot on some setups)."""

    fused_kernels: bool = False
    int8_triton_layers: int = 0       # int8 linear layers computing with the Triton GEMM
    skinny_matmul: bool = False
    skinny_pdl: bool = False


def enable_kernel_paths(model, config, device: torch.device, tp_size: int,
                        quantization: str) -> KernelPaths:
    """Switch the model's modules onto the Triton paths the config asks for and can use."""
    paths = KernelPaths()
    if not getattr(config, "fused_kernels", False):
        return paths
    if device.type != "cuda":
        logger.info("fused_kernels ignored on %s (Triton kernels run on CUDA only)", device)
        return paths
    try:
        from llmbatch.runtime.layers import fused_kernels  # noqa: F401  (imports triton)
    except ImportError as exc:
        logger.warning("fused_kernels ignored: triton does not import (%s)", exc)
        return paths
    from llmbatch.runtime.layers.activation import SiluAndMul
    from llmbatch.runtime.layers.norm import RMSNorm
    from llmbatch.runtime.layers.quantization import enable_triton_int8
    from llmbatch.runtime.models.llama import LlamaAttention

    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul)):
            module.use_fused_kernel = True
        elif isinstance(module, LlamaAttention):
            module.use_fused_rotary = True
    paths.fused_kernels = True
    paths.int8_triton_layers = enable_triton_int8(model)

    pdl = bool(getattr(config, "pdl", False))
    if pdl and torch.cuda.get_device_capability(device)[0] < 9:
        logger.info("pdl ignored: programmatic dependent launch needs sm_90 or newer")
        pdl = False
    if getattr(config, "skinny_matmul", False):
        from llmbatch.runtime.models.llama_skinny import enable_skinny_matmul

        if tp_size == 1 and quantization == "none" and enable_skinny_matmul(model, pdl=pdl):
            paths.skinny_matmul, paths.skinny_pdl = True, pdl
            logger.info("skinny_matmul on: fused decoder layers for steps of <= 16 tokens"
                        + (", programmatic dependent launch" if pdl else ""))
        else:
            logger.info("skinny_matmul ignored: needs tensor_parallel_size 1, unquantized "
                        "weights and a Llama-family model")
    elif pdl:
        logger.info("pdl ignored: it applies to the skinny_matmul kernels only")
    return paths
