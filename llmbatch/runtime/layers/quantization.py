"""bitsandbytes weight quantization (int8, nf4) of every linear layer, applied at load time.

The loader fills each linear layer with this rank's dense slice (model dtype), then calls
`quant_method.process_weights_after_loading(layer)`; the slice is quantized there, so a rank
only ever quantizes what it holds. The embedding and LM head are not LinearBase layers and stay
in the model dtype.

    nf4   bnb.functional.quantize_4bit(blocksize 64, no double quant): the rank's weight
          (out, in) is flattened row-major and cut into blocks of 64 elements, each with one
          float32 absmax. 0.5 + 4/64 bytes per weight (0.28x of bf16). Forward: bnb.matmul_4bit
          on CUDA; on CPU the flat dequantized weight in F.linear (see process_weights...).
          Slices line up with quantize-then-slice when every slice boundary falls on a block
          boundary: column-parallel rows start at row*in (a multiple of 64 when in % 64 == 0),
          row-parallel columns need in_per_rank % 64 == 0. Otherwise the slice is quantized on
          its own 64-blocks (still 64 elements each, just grouped differently from the full
          tensor's) -- nothing is refused, accuracy is the same kind.
    int8  bnb.functional.int8_vectorwise_quant: int8 weight with one float32 absmax per output
          row (1 + 4/in bytes per weight). Forward is weight-only: the int8 rows are scaled back
          to the activation dtype and used in F.linear (no int8 activations, so no LLM.int8
          outlier handling is needed for accuracy).
Checkpoints already quantized by bitsandbytes are dequantized while loading and requantized per
slice with their own method (bnb_checkpoint.py).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCKSIZE = 64
METHODS = ("int8", "nf4")


def import_bnb():
    """bitsandbytes, or a one-line ImportError saying how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise ImportError("quantization needs bitsandbytes, which is not installed: "
                          "pip install bitsandbytes") from None
    return bitsandbytes


class BnbLinearMethod:
    """A LinearBase `quant_method`: owns nothing; the quantized tensors live on the layer as
    buffers `qweight` (+ `qabsmax` for nf4, `qscale` for int8), the dense `weight` is dropped."""

    def __init__(self, method: str, device=None) -> None:
        """device: where the quantized tensors go (None: where the dense weight is). The
        dense slice may be staged on the host; it is moved one layer at a time."""
        if method not in METHODS:
            raise ValueError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
        self.method = method
        self.device = device
        self.bnb = import_bnb()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bf = self.bnb.functional
        w = layer.weight.data  # (out_per_rank, in_per_rank), model dtype, this rank's slice
        if self.device is not None:
            w = w.to(self.device)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(w.device)
        if self.method == "nf4":
            # Quantized as a flat vector: the blocks run over the row-major flattened slice.
            packed, flat_state = bf.quantize_4bit(w.reshape(-1), blocksize=NF4_BLOCKSIZE,
                                                  quant_type="nf4", compress_statistics=False)
            state = copy.copy(flat_state)
            state.shape = w.shape
            layer.register_buffer("qweight", packed)          # (numel/2, 1) uint8
            layer.register_buffer("qabsmax", state.absmax)    # (ceil(numel/64),) float32
            layer.quant_state = state                         # shape, dtype, code (16 levels)
            # bitsandbytes 0.50's CPU dequantize (and matmul_4bit) is wrong for 2-D shapes
            # whose rows are not whole blocks, e.g. (128, 32); flat dequantization is right.
            layer.quant_state_flat = flat_state
        else:
            if w.is_cuda and w.dtype != torch.float16:
                # bitsandbytes' CUDA int8 quantizer takes float16 only (0.50: "A must be
                # float16"); the row absmax it returns is float32 either way.
                w16 = w.to(torch.float16)
                if not torch.isfinite(w16).all():
                    raise ValueError("int8 quantization: a weight exceeds float16's range "
                                     "(|w| > 65504); use nf4 or no quantization for this model")
                w = w16
            cb, scb, _ = bf.int8_vectorwise_quant(w.contiguous())
            layer.register_buffer("qweight", cb)              # (out, in) int8
            layer.register_buffer("qscale", scb.float())      # (out,) row absmax
        layer.weight = None  # the dense slice is freed here

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """This rank's weight (out, in) as the model would use it (tests, debugging)."""
        if self.method == "nf4":
            flat = self.bnb.functional.dequantize_4bit(layer.qweight, layer.quant_state_flat)
            return flat.view(layer.quant_state.shape).to(dtype)
        return layer.qweight.to(dtype) * (layer.qscale / 127.0).to(dtype).unsqueeze(1)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.method == "nf4" and x.is_cuda:
            return self.bnb.matmul_4bit(x, layer.qweight.t(), quant_state=layer.quant_state,
                                        bias=bias)
        return F.linear(x, self.dequantize(layer, x.dtype), bias)


def attach_quantization(model: nn.Module, method: str, hf_config=None, device=None) -> int:
    """Give every linear layer of `model` a quant_method (before load_weights). Returns how
    many layers will be quantized. With hf_config, a checkpoint already quantized by
    bitsandbytes sets the method (bnb_checkpoint.resolve_method; a conflicting method or an
    unsupported quantization is a ValueError). device: where quantized weights are put."""
    from llmbatch.runtime.layers.bnb_checkpoint import resolve_method
    from llmbatch.runtime.layers.linear import LinearBase

    if hf_config is not None:
        method, _ = resolve_method(method, hf_config)
    if method in (None, "none"):
        return 0
    quant = BnbLinearMethod(method, device)
    count = 0
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method = quant
            count += 1
    return count


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, number of weights) of the linear layers' weights as loaded: the dense weight, or
    the quantized buffers including their statistics. Biases are not counted."""
    from llmbatch.runtime.layers.linear import LinearBase

    nbytes = numel = 0
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        numel += module.output_size_per_rank * module.input_size_per_rank
        if module.weight is not None:
            nbytes += _tensor_bytes(module.weight)
        else:
            nbytes += sum(_tensor_bytes(getattr(module, n)) for n in ("qweight", "qabsmax", "qscale")
                          if getattr(module, n, None) is not None)
    return nbytes, numel


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of everything loaded from the checkpoint on this rank: parameters (tied ones once)
    plus the quantized buffers. Rotary caches and other derived buffers are not weights."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += _tensor_bytes(p)
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in ("qweight", "qabsmax", "qscale"):
            total += _tensor_bytes(b)
    return total
