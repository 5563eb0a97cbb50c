"""Which Triton kernel paths a loaded model takes, from EngineConfig and the device.

    fused_kernels   (default on)  RMSNorm, SiLU·mul, rotary (+ K/V store) as Triton kernels
                                  (layers/fused_kernels.py, layers/fused_rotary.py); and
                                  int8-quantized linear layers on the w8a16 GEMM
                                  (layers/int8_matmul.py) instead of dequantizing per call,
                                  with nf4_triton_gemm (opt-in), nf4 ones (and an nf4 LM
                                  head) on the w4a16 GEMM (layers/nf4_matmul.py) instead of
                                  bnb.matmul_4bit
    skinny_matmul   (opt-in)      steps of <= 16 tokens run 6-launch decoder layers
                                  (models/llama_skinny.py); tensor_parallel_size 1, dense
    skinny_gemv     (auto: on)    one-token steps run those layers on layers/gemv.py's
                                  one-row kernels (7 launches), one-row LM head calls too;
                                  tensor_parallel_size 1, dense; checked against torch at
                                  start-up (models/gemv_check.py), off where that fails
    gemv_max_rows   (1; opt-in up to 8) with skinny_gemv, steps of up to that many tokens
                                  (batch-1 verify steps) on gemv_linear's multi-row kernel,
                                  LM head calls too; unmeasured; start-up check at R rows too
    gemv_weight_prefetch (auto: tile with pdl) off | tile | l2 | both: what a gemv program
                                  reads of its weights before its PDL wait (layers/gemv.py)
    pdl             (auto: sm_90) our Triton kernels (fused, attention, skinny, gemv) launch
                                  with programmatic dependent launch (runtime/pdl.py)
    l2_prefetch     (opt-in)      steps of <= 16 tokens touch the small matmuls' weights into
                                  L2 on a side stream ahead of use (models/llama_prefetch.py);
                                  dense weights, not with the skinny / gemv layers

All of them need CUDA: on the CPU the Triton interpreter would be far slower than torch, so the
options are ignored there, as they are when they cannot apply: logged when the config asked
for them (True), silently for the auto ones (None) left at their default. The switches are flags
on the model's modules, set once after loading and before CUDA graphs are captured.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
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
    nf4_triton_layers: int = 0        # nf4 linear layers (+ LM head) on the Triton GEMM
    nf4_triton_error: Optional[str] = None
    skinny_matmul: bool = False
    skinny_pdl: bool = False
    skinny_gemv: bool = False
    gemv_max_rows: int = 1            # steps of up to this many tokens on the gemv kernels
    # Why the start-up check turned the gemv layers off, or (skinny_gemv still on) only
    # the multi-row ones (gemv_max_rows back to 1; models/gemv_check.py).
    skinny_gemv_error: Optional[str] = None
    gemv_weight_prefetch: str = "off"   # EngineConfig.gemv_weight_prefetch where it applied
    l2_prefetch_weights: int = 0      # weights touched into L2 per small step (0: off)
    pdl: bool = False                 # our Triton kernels launch with PDL (runtime/pdl.py)


# The PDL switch (runtime/pdl.py) and the gemv weight-prefetch switches (layers/gemv.py) are
# process-wide, so they belong to an engine, not to each of its runners. A speculative draft
# model has a runner of its own (draft_proposer.py), built after the target's: had it reset and
# set the switches from its own view, a draft that the gemv layers do not apply to would turn
# the target's weight prefetch off while the target's stats still reported it. Runners built
# inside inheriting_process_switches() leave them as they are and run with them.
_inherit_switches = False


@contextmanager
def inheriting_process_switches():
    """Runners built inside (a draft model's) neither reset nor set the process-wide switches:
    their kernels launch with the ones the engine's own runner set, their PDL and weight
    prefetch follow those switches, and their start-up checks run with them."""
    global _inherit_switches
    before, _inherit_switches = _inherit_switches, True
    try:
        yield
    finally:
        _inherit_switches = before


def enable_kernel_paths(model, config, device: torch.device, tp_size: int,
                        quantization: str) -> KernelPaths:
    """Switch the model's modules onto the Triton paths the config asks for and can use."""
    from llmbatch.runtime import pdl as pdl_switch

    paths = KernelPaths()
    inherit = _inherit_switches
    if not inherit:   # process-wide: a previous engine's setting must not leak
        pdl_switch.set_enabled(False)
        gemv_module = sys.modules.get("llmbatch.runtime.layers.gemv")   # imported: triton is
        if gemv_module is not None:   # there; the same for the gemv weight prefetches
            gemv_module.set_prefetch_mode("off")
    if not getattr(config, "fused_kernels", False):
        asked = [o for o in ("skinny_matmul", "skinny_gemv", "pdl", "l2_prefetch")
                 if getattr(config, o, False) is True]
        if asked:  # they run on top of the fused kernels (EngineConfig)
            logger.info("%s ignored: needs fused_kernels", " and ".join(asked))
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
    from llmbatch.runtime.layers.quantization import enable_triton_int8, enable_triton_nf4
    from llmbatch.runtime.models.llama import LlamaAttention

    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul)):
            module.use_fused_kernel = True
        elif isinstance(module, LlamaAttention):
            module.use_fused_rotary = True
    paths.fused_kernels = True
    gemms = [("int8", enable_triton_int8)]
    if getattr(config, "nf4_triton_gemm", False):   # opt-in: slower than bitsandbytes so far
        gemms.append(("nf4", enable_triton_nf4))
    for method, enable in gemms:
        layers = enable(model)  # 0 unless the model is quantized with `method`
        error = check_quant_kernel(model, method) if layers else None
        if error is not None:
            logger.warning("%s Triton GEMM off, using the dequantize / bitsandbytes path: %s",
                           method, error)
            disable_triton(model, method)
            layers = 0
        setattr(paths, f"{method}_triton_layers", layers)
        setattr(paths, f"{method}_triton_error", error)

    if inherit:   # what the engine's runner decided, whatever this config says
        from llmbatch.runtime.layers import gemv as gemv_layers

        pdl = pdl_switch.enabled()
        prefetch_mode = gemv_layers.prefetch_mode()
    else:
        pdl_asked = getattr(config, "pdl", None)   # None: auto, on where it can apply
        pdl_unavailable = pdl_switch.unavailable_reason(device) if pdl_asked is not False else None
        pdl = pdl_asked is not False and pdl_unavailable is None
        if pdl_asked is True and not pdl:
            logger.info("pdl ignored: %s", pdl_unavailable)
        # None (auto): "tile" with PDL (the overlap it buys is with the previous kernel's
        # drain, which only PDL gives; measured so in stop 19), "off" without.
        prefetch_asked = getattr(config, "gemv_weight_prefetch", None)
        prefetch_mode = (("tile" if pdl else "off") if prefetch_asked is None
                         else prefetch_asked)
    _enable_skinny_layers(model, config, tp_size, quantization, pdl, prefetch_mode, paths)
    if inherit:
        paths.gemv_weight_prefetch = prefetch_mode if paths.skinny_gemv else "off"
    else:
        _enable_gemv_weight_prefetch(prefetch_mode, paths, asked=prefetch_asked is not None)
    if pdl:
        if not inherit:
            pdl_switch.set_enabled(True)
            logger.info("pdl on: our Triton kernels launch with programmatic dependent launch")
        paths.pdl = True
    if getattr(config, "l2_prefetch", False):
        _enable_l2_prefetch(model, device, paths)
    return paths


def _enable_skinny_layers(model, config, tp_size: int, quantization: str, pdl: bool,
                          prefetch_mode: str, paths: KernelPaths) -> None:
    """skinny_matmul: steps of <= 16 tokens on models/llama_skinny.py's fused layers;
    skinny_gemv (auto on): one-token steps on its one-row kernels, with or without
    skinny_matmul. An explicit l2_prefetch turns the auto gemv off (the prefetch hooks live in
    the unfused layers; one or the other)."""
    skinny = bool(getattr(config, "skinny_matmul", False))
    gemv_asked = getattr(config, "skinny_gemv", None)
    if gemv_asked is None and getattr(config, "l2_prefetch", False) and not skinny:
        gemv_asked = False
    gemv = gemv_asked is not False
    if not (skinny or gemv):
        return
    from llmbatch.runtime.models.llama_skinny import enable_skinny_matmul

    dense = tp_size == 1 and quantization == "none"
    # EngineConfig.gemv_max_rows (opt-in): steps of up to that many tokens on the gemv kernels.
    max_rows = getattr(config, "gemv_max_rows", 1) if gemv else 1
    if dense and enable_skinny_matmul(model, pdl=pdl, gemv_rows=gemv, small_steps=skinny,
                                      gemv_max_rows=max_rows):
        from llmbatch.runtime.models.gemv_check import gemv_rows_after_check, gemv_steps

        if gemv:
            max_rows, paths.skinny_gemv_error = gemv_rows_after_check(model, skinny, pdl,
                                                                      prefetch_mode, max_rows)
            gemv, max_rows = max_rows > 0, max(max_rows, 1)
            if not (skinny or gemv):
                return
        paths.skinny_matmul, paths.skinny_gemv, paths.skinny_pdl = skinny, gemv, pdl
        paths.gemv_max_rows = max_rows if gemv else 1
        steps = gemv_steps(max_rows)
        if skinny:
            logger.info("skinny_matmul on: fused decoder layers for steps of <= 16 tokens"
                        + (f", {steps} on the gemv kernels" if gemv else "")
                        + (", programmatic dependent launch" if pdl else ""))
        else:
            logger.info("skinny_gemv on: %s on the %sgemv kernels%s", steps,
                        "one-row " if max_rows == 1 else "",
                        ", programmatic dependent launch" if pdl else "")
        return
    asked = [o for o, on in (("skinny_matmul", skinny), ("skinny_gemv", gemv_asked is True))
             if on]
    if asked:
        logger.info("%s ignored: needs tensor_parallel_size 1, unquantized weights and a "
                    "Llama-family model", " and ".join(asked))


def _enable_gemv_weight_prefetch(mode: str, paths: KernelPaths, asked: bool) -> None:
    """EngineConfig.gemv_weight_prefetch ("off", "tile", "l2", "both"; auto: "tile") onto
    layers/gemv.py's process-wide switches, only where the gemv layers are on
    (enable_kernel_paths reset both switches for this engine first). asked: the config named
    the mode, so it is logged when it cannot apply; the auto default is not."""
    if mode == "off":
        return
    if not paths.skinny_gemv:
        if asked:
            logger.info("gemv_weight_prefetch ignored: the gemv layers are off")
        return
    from llmbatch.runtime.layers import gemv as gemv_layers

    gemv_layers.set_prefetch_mode(mode)
    paths.gemv_weight_prefetch = mode
    logger.info("gemv_weight_prefetch %s: gemv programs read %s before their PDL wait", mode,
                {"tile": "their first weight tile", "l2": "their weight slice into L2",
                 "both": "their first weight tile and their slice into L2"}[mode])


def _enable_l2_prefetch(model, device: torch.device, paths: KernelPaths) -> None:
    if paths.skinny_matmul or paths.skinny_gemv:
        logger.info("l2_prefetch ignored: the skinny layers are on (one or the other)")
        return
    from llmbatch.runtime.models.llama_prefetch import enable_l2_prefetch

    paths.l2_prefetch_weights = enable_l2_prefetch(model, device)
    if paths.l2_prefetch_weights:
        logger.info("l2_prefetch on: %d weights touched into L2 per step of <= 16 tokens",
                    paths.l2_prefetch_weights)
    else:
        logger.info("l2_prefetch ignored: needs a Llama-family model with dense weights")


PATH_STATS = ("fused_kernels_active", "skinny_matmul_active", "skinny_pdl_active",
              "skinny_gemv_active", "skinny_gemv_error", "gemv_max_rows_active",
              "gemv_weight_prefetch",
              "pdl_active", "l2_prefetch_weights", "int8_triton_layers", "int8_triton_error",
              "nf4_triton_layers", "nf4_triton_error")


def agree_across_ranks(runner, gather_ints) -> None:
    """Tensor parallelism: every rank ran its own start-up check on its own slice. Where one
    rank turned a quantized GEMM off, every rank turns it off, so all ranks compute their
    share the same way and rank 0's stats (the engine's) tell the truth. `gather_ints(v)` is
    v of every rank (a collective: every rank calls this, with the same methods, in order)."""
    for method in ("int8", "nf4"):
        key = f"{method}_triton_layers"
        per_rank = gather_ints(getattr(runner, key))
        if getattr(runner, key) and min(per_rank) == 0:
            disable_triton(runner.model, method)
            setattr(runner, key, 0)
            setattr(runner, f"{method}_triton_error", getattr(
                runner, f"{method}_triton_error", None) or (
                f"off on every rank: rank {per_rank.index(0)}'s start-up check failed "
                f"(its log says why)"))


def _triton_methods(model, method: str):
    """(layer, BnbLinearMethod) of `model`'s `method` layers that use the Triton GEMM."""
    from llmbatch.runtime.layers.quantization import triton_gemm_modules

    return ((m, q) for m, q in triton_gemm_modules(model, method) if q.use_triton)


def disable_triton(model, method: str) -> None:
    for _, quant in _triton_methods(model, method):
        quant.use_triton = False


@torch.inference_mode()
def check_quant_kernel(model, method: str, row_counts=(1, 40, 200)) -> Optional[str]:
    """The Triton GEMM of `method` ("int8": w8a16, "nf4": w4a16) against the dequantize path
    on the model's first such layer, once per tile bucket of int8_matmul / nf4_matmul (decode,
    small and large batches), at start-up: a kernel that is wrong on this GPU (they were
    written and tested in the CPU interpreter) must cost speed, never tokens. Returns a one-line
    reason when it differs, else None. The tolerance admits bf16 rounding of the output, not a
    wrong index, nibble or scale (those are off by O(|y|))."""
    import torch.nn.functional as F

    from llmbatch.runtime.layers.quantization import takes_triton_gemm, triton_gemm

    # Layers that keep bitsandbytes (nf4 with in_features % 64 != 0) are skipped.
    found = next(((layer, quant) for layer, quant in _triton_methods(model, method)
                  if takes_triton_gemm(layer, method)), None)
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
            # The GEMM itself, not apply (which would quietly fall back where Triton can't run).
            got = triton_gemm(layer, method, x, None).float()
        except Exception as exc:  # a compile or launch failure on this GPU
            return f"{m} rows: {type(exc).__name__}: {exc}"
        err = (got - want).abs().max().item()
        bound = 0.03 * want.abs().max().item() + 1e-3
        if not err <= bound:   # also catches NaN
            return (f"{m} rows: max |Triton - dequantized| = {err:.3g} exceeds {bound:.3g} "
                    f"on a ({w.shape[0]}, {w.shape[1]}) layer")
    return None
