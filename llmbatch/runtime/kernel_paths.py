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
from typing import Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class KernelPaths:
    """What applied (engine.stats() reports it: options are silently moot on some setups)."""

    fused_kernels: bool = False
    int8_triton_layers: int = 0       # int8 linear layers computing with the Triton GEMM
    int8_triton_error: Optional[str] = None   # why the start-up check turned the GEMM off
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
    if paths.int8_triton_layers:
        paths.int8_triton_error = check_int8_kernel(model)
        if paths.int8_triton_error is not None:
            logger.warning("int8 Triton GEMM off, dequantizing per call instead: %s",
                           paths.int8_triton_error)
            disable_triton_int8(model)
            paths.int8_triton_layers = 0

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


def _triton_int8_methods(model):
    """The int8 BnbLinearMethods of `model` that use the Triton GEMM, with a layer of each."""
    from llmbatch.runtime.layers.quantization import BnbLinearMethod

    for module in model.modules():
        quant = getattr(module, "quant_method", None)
        if isinstance(quant, BnbLinearMethod) and quant.method == "int8" and quant.use_triton:
            yield module, quant


def disable_triton_int8(model) -> None:
    for _, quant in _triton_int8_methods(model):
        quant.use_triton = False


@torch.inference_mode()
def check_int8_kernel(model, row_counts=(1, 40, 200)) -> Optional[str]:
    """The w8a16 GEMM against the dequantize path on the model's first int8 layer, once per
    tile bucket of int8_matmul (decode, small and large batches), at start-up: a kernel that
    is wrong on this GPU (it was written and tested in the CPU interpreter) must cost speed,
    never tokens. Returns a one-line reason when it differs, else None. The tolerance admits
    bf16 rounding of the output, not a wrong index or scale (those are off by O(|y|))."""
    import torch.nn.functional as F

    from llmbatch.runtime.layers.int8_matmul import int8_linear

    found = next(_triton_int8_methods(model), None)
    if found is None:
        return None
    layer, quant = found
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    w = quant.dequantize(layer, torch.float32)                  # (out, in)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m in row_counts:
        x = torch.randn(m, w.shape[1], generator=gen).to(dtype=dtype, device=w.device)
        want = F.linear(x.float(), w)
        try:
            got = int8_linear(x, layer.qweight, layer.qscale, None).float()
        except Exception as exc:  # a compile or launch failure on this GPU
            return f"{m} rows: {type(exc).__name__}: {exc}"
        err = (got - want).abs().max().item()
        bound = 0.03 * want.abs().max().item() + 1e-3
        if not err <= bound:   # also catches NaN
            return (f"{m} rows: max |Triton - dequantized| = {err:.3g} exceeds {bound:.3g} "
                    f"on a ({w.shape[0]}, {w.shape[1]}) layer")
    return None

