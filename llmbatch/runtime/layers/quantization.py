"""bitsandbytes weight quantization (int8, nf4) of every linear layer, applied at load time.

The loader fills each linear layer with this rank's dense slice (model dtype), then calls
`quant_method.process_weights_after_loading(layer)`; the slice is quantized there, so a rank
only ever quantizes what it holds. The embedding and LM head are not LinearBase layers and stay
in the model dtype unless EngineConfig.quantize_embeddings (nf4 only, see Nf4EmbeddingMethod).

    nf4   bnb.functional.quantize_4bit(blocksize 64, no double quant): the rank's weight
          (out, in) is flattened row-major and cut into blocks of 64 elements, each with one
          float32 absmax. 0.5 + 4/64 bytes per weight (0.28x of bf16). Forward: with the
          engine's fused kernels on CUDA (enable_triton_nf4) the Triton w4a16 GEMM of
          nf4_matmul.py (in_features % 64 == 0; others keep bitsandbytes), else bnb.matmul_4bit
          on CUDA; on CPU the flat dequantized weight in F.linear (see process_weights...).
          Slices line up with quantize-then-slice when every slice boundary falls on a block
          boundary: column-parallel rows start at row*in (a multiple of 64 when in % 64 == 0),
          row-parallel columns need in_per_rank % 64 == 0. Otherwise the slice is quantized on
          its own 64-blocks (still 64 elements each, just grouped differently from the full
          tensor's) -- nothing is refused, accuracy is the same kind.
    int8  bnb.functional.int8_vectorwise_quant: int8 weight with one float32 absmax per output
          row (1 + 4/in bytes per weight). Forward is weight-only: the int8 rows are scaled back
          to the activation dtype and used in F.linear (no int8 activations, so no LLM.int8
          outlier handling is needed for accuracy). With the engine's fused kernels on CUDA
          (enable_triton_int8) the Triton w8a16 GEMM of int8_matmul.py reads the int8 weight
          directly instead of materialising the dequantized copy on every call.
Checkpoints already quantized by bitsandbytes are dequantized while loading and requantized per
slice with their own method (bnb_checkpoint.py).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCKSIZE = 64
METHODS = ("int8", "nf4")


# bitsandbytes' CPU backend tries, at import, an optional kernel from the `kernels` package
# and warns on every import where it is missing ("Failed to load CPU gemm_4bit_forward from
# kernels-community ..."): on stderr of every int8/nf4 CPU job, about a speed-up we do not
# use (our CPU path is its own fallback). Only that logger, only during the import.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bnb():
    """bitsandbytes, or a one-line ImportError saying how to install it."""
    import logging

    log = logging.getLogger(_BNB_CPU_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise ImportError("quantization needs bitsandbytes, which is not installed: "
                          "pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def quantize_nf4(layer: nn.Module, w: torch.Tensor) -> None:
    """Store `w` (rows, cols) on `layer` as nf4 buffers `qweight`, `qabsmax` plus the 2-D
    `quant_state` and the flat `quant_state_flat` (the dense weight is the caller's to drop)."""
    bf = import_bnb().functional
    # Quantized as a flat vector: the blocks run over the row-major flattened slice.
    packed, flat_state = bf.quantize_4bit(w.reshape(-1), blocksize=NF4_BLOCKSIZE,
                                          quant_type="nf4", compress_statistics=False)
    # A weight staged in float32 (stage_in_float32) still dequantizes to the model's dtype.
    flat_state.dtype = getattr(layer, "quant_dtype", w.dtype)
    state = copy.copy(flat_state)
    state.shape = w.shape
    layer.register_buffer("qweight", packed)          # (numel/2, 1) uint8
    layer.register_buffer("qabsmax", state.absmax)    # (ceil(numel/64),) float32
    layer.quant_state = state                         # shape, dtype, code (16 levels)
    # bitsandbytes 0.50's CPU dequantize (and matmul_4bit) is wrong for 2-D shapes
    # whose rows are not whole blocks, e.g. (128, 32); flat dequantization is right.
    layer.quant_state_flat = flat_state


class BnbLinearMethod:
    """A LinearBase `quant_method`: owns nothing; the quantized tensors live on the layer as
    buffers `qweight` (+ `qabsmax` for nf4, `qscale` for int8), the dense `weight` is dropped."""

    # apply runs the Triton GEMM (int8_matmul.int8_linear / nf4_matmul.nf4_linear) instead of
    # F.linear of the dequantized weight (int8) or bnb.matmul_4bit (nf4). Set by
    # enable_triton_int8 / enable_triton_nf4 (runtime/kernel_paths.py: fused kernels on CUDA).
    use_triton: bool = False

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
            quantize_nf4(layer, w)
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
        # In float32, rounded once to `dtype`: code x scale in bf16 rounded the scale first
        # (a checkpoint's int8 weights came out one bf16 ulp off on ~20 %).
        return (layer.qweight.float() * (layer.qscale / 127.0).unsqueeze(1)).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.use_triton and _triton_runs_on(x) and takes_triton_gemm(layer, self.method):
            return triton_gemm(layer, self.method, x.contiguous(), bias)
        if self.method == "nf4" and x.is_cuda:
            return self.bnb.matmul_4bit(x, layer.qweight.t(), quant_state=layer.quant_state,
                                        bias=bias)
        # Fallback (CPU, fused kernels off): a dequantized (out, in) copy per call.
        return F.linear(x, self.dequantize(layer, x.dtype), bias)


def takes_triton_gemm(layer: nn.Module, method: str) -> bool:
    """Whether a layer switched to the Triton GEMM (use_triton) computes with it: int8 always;
    nf4 when in_features is a multiple of 64 (nf4_matmul's rows are whole blocks), else
    bitsandbytes keeps it."""
    return method != "nf4" or layer.quant_state.shape[1] % NF4_BLOCKSIZE == 0


def triton_gemm(layer: nn.Module, method: str, x: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's quantized weight times x on the Triton GEMM of `method` (w8a16 int8_matmul,
    w4a16 nf4_matmul). Module attributes are looked up per call (tests patch the kernels)."""
    if method == "int8":
        from llmbatch.runtime.layers import int8_matmul

        return int8_matmul.int8_linear(x, layer.qweight, layer.qscale, bias)
    from llmbatch.runtime.layers import nf4_matmul

    out_features, in_features = layer.quant_state.shape
    return nf4_matmul.nf4_linear(x, layer.qweight, layer.qabsmax, layer.quant_state.code,
                                 out_features, in_features, bias)


def _triton_runs_on(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU ones only under the interpreter (tests)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def triton_gemm_modules(model: nn.Module, method: str):
    """(module, BnbLinearMethod) of every layer of `model` whose forward is `apply` with
    `method` ("int8" | "nf4"): the linear layers, and for nf4 the quantized LM head
    (Nf4EmbeddingMethod; the token embedding only looks rows up, it has no GEMM)."""
    from llmbatch.runtime.layers.embedding import ParallelLMHead
    from llmbatch.runtime.layers.linear import LinearBase

    for module in model.modules():
        quant = getattr(module, "quant_method", None)
        if isinstance(module, (LinearBase, ParallelLMHead)) \
                and isinstance(quant, BnbLinearMethod) and quant.method == method:
            yield module, quant


def enable_triton_int8(model: nn.Module) -> int:
    """Switch every int8 linear layer of `model` to the Triton w8a16 GEMM (int8_matmul.py);
    the caller checks that Triton can run (CUDA, or the interpreter). Returns how many layers
    use it (0 for a dense or nf4 model). Layers share one BnbLinearMethod, set once each."""
    return _enable_triton(model, "int8")


def enable_triton_nf4(model: nn.Module) -> int:
    """enable_triton_int8 for nf4: the linear layers and a quantized LM head switch to the
    w4a16 GEMM (nf4_matmul.py). Used for every M, decode (M=1) included: bitsandbytes' own
    one-row inference kernel is not kept (a benchmark A/B has to decide that). Layers whose
    in_features is not a multiple of 64 still take bitsandbytes (checked per call in apply)."""
    return _enable_triton(model, "nf4")


def _enable_triton(model: nn.Module, method: str) -> int:
    count = 0
    for module, quant in triton_gemm_modules(model, method):
        quant.use_triton = True
        # Counted only where apply takes the GEMM (else the stats would claim layers that
        # never run it).
        count += takes_triton_gemm(module, method)
    return count


def stage_in_float32(model: nn.Module, dtype: torch.dtype) -> None:
    """A checkpoint pre-quantized by bitsandbytes (bnb_checkpoint.py) is dequantized into the
    linear layers' dense weights and requantized from them. Staged in bf16/fp16 those weights
    round each block's scale (nf4 double quant's absmax, an int8 SCB of fp16 weights are not
    bf16 values), and ~18 % of the requantized weights came out one ulp off the checkpoint's.
    In float32 the requantization gives back the checkpoint's scales and codes. Cost: the
    host holds these dense slices in float32 (2x bf16) until each layer is quantized.
    Call after attach_quantization, before load_weights; `dtype` is the model's."""
    from llmbatch.runtime.layers.linear import LinearBase

    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, LinearBase) and isinstance(module.quant_method, BnbLinearMethod):
            module.weight.data = module.weight.data.float()   # (keeps its loader attributes)
            module.quant_dtype = dtype


def attach_quantization(model: nn.Module, method: str, hf_config=None, device=None,
                        embeddings: bool = False) -> int:
    """Give every linear layer of `model` a quant_method (before load_weights). Returns how
    many layers will be quantized. With hf_config, a checkpoint already quantized by
    bitsandbytes sets the method (bnb_checkpoint.resolve_method; a conflicting method or an
    unsupported quantization is a ValueError). device: where quantized weights are put.
    embeddings (EngineConfig.quantize_embeddings): the token embedding and LM head too
    (Nf4EmbeddingMethod; nf4 only, hidden_size a multiple of 64); counted as well."""
    from llmbatch.runtime.layers.bnb_checkpoint import resolve_method
    from llmbatch.runtime.layers.embedding import VocabParallelEmbedding
    from llmbatch.runtime.layers.linear import LinearBase

    if hf_config is not None:
        method, _ = resolve_method(method, hf_config)
    if embeddings and method != "nf4":
        raise ValueError(f"quantize_embeddings supports nf4 only, got quantization={method!r}")
    if method in (None, "none"):
        return 0
    quant = BnbLinearMethod(method, device)
    count = 0
    owner_of_weight: dict[int, nn.Module] = {}  # id(dense Parameter) -> first module holding it
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method = quant
            count += 1
        elif embeddings and isinstance(module, VocabParallelEmbedding):  # + ParallelLMHead
            # Tied embedding and head share one Parameter: the first module in modules() order
            # (the loader's order too) quantizes it, the other reuses its buffers.
            tied_to = owner_of_weight.setdefault(id(module.weight), module)
            module.quant_method = Nf4EmbeddingMethod(
                module.embedding_dim, device, tied_to=None if tied_to is module else tied_to)
            count += 1
    return count


class Nf4EmbeddingMethod(BnbLinearMethod):
    """quant_method of a VocabParallelEmbedding / ParallelLMHead (quantize_embeddings).

    This rank's (num_embeddings_per_rank, hidden) table is quantized like an nf4 linear weight
    (flat, 64-element blocks, one float32 absmax each). With hidden % 64 == 0 every row is whole
    blocks: row r is packed bytes [r*hidden/2, (r+1)*hidden/2) and absmax [r*hidden/64,
    (r+1)*hidden/64), so (a) a lookup dequantizes only the looked-up rows and (b) quantizing a
    tensor-parallel rank's rows gives the very blocks of the full table (TP is supported).
    The LM head is `apply` of the nf4 linear method (the Triton nf4 GEMM with fused kernels
    on CUDA, else matmul_4bit on CUDA, F.linear of the dequantized table on CPU). Tied: one quantized copy, the dense Parameter is freed.
    """

    def __init__(self, hidden_size: int, device=None,
                 tied_to: Optional[nn.Module] = None) -> None:
        if hidden_size % NF4_BLOCKSIZE:
            raise ValueError(f"quantize_embeddings needs hidden_size divisible by "
                             f"{NF4_BLOCKSIZE}, got {hidden_size}")
        super().__init__("nf4", device)
        self.hidden_size = hidden_size
        self.tied_to = tied_to  # the module whose quantized buffers this one shares

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.tied_to is not None:
            src = self.tied_to
            if getattr(src, "qweight", None) is None:
                raise RuntimeError("tied embedding: the owner of the weight was not quantized")
            # The same tensors (one copy, counted once by model_weight_bytes). They are
            # already on the target device, so the runner's later model.to() keeps them shared.
            layer.register_buffer("qweight", src.qweight)
            layer.register_buffer("qabsmax", src.qabsmax)
            layer.quant_state, layer.quant_state_flat = src.quant_state, src.quant_state_flat
        else:
            w = layer.weight.data  # (num_embeddings_per_rank, hidden), model dtype
            quantize_nf4(layer, w if self.device is None else w.to(self.device))
        layer.weight = None  # with both tied modules done, nothing holds the dense table

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) int64 row indices of this rank's table -> (n, hidden) in the model dtype.
        Gathers the rows' packed bytes and absmax and dequantizes only those n rows."""
        hidden = self.hidden_size
        flat_state = layer.quant_state_flat
        ids = ids.reshape(-1)
        n = ids.numel()
        if n == 0:
            return torch.empty(0, hidden, dtype=flat_state.dtype, device=layer.qweight.device)
        packed = layer.qweight.view(-1, hidden // 2)[ids]                   # (n, hidden/2) uint8
        absmax = layer.qabsmax.view(-1, hidden // NF4_BLOCKSIZE)[ids]       # (n, hidden/64)
        state = copy.copy(flat_state)  # code, blocksize, dtype shared; absmax and shape are n's
        state.absmax = absmax.reshape(-1)
        state.shape = torch.Size([n * hidden])
        flat = self.bnb.functional.dequantize_4bit(packed.reshape(-1, 1), state)
        return flat.view(n, hidden)


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
