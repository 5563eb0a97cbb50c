"""Checkpoints already quantized by bitsandbytes (transformers' serialization), read back into
dense tensors so the normal loader can slice them and BnbLinearMethod can requantize each slice.

Recognised by config.json's `quantization_config` (quant_method "bitsandbytes"):
    load_in_4bit, nf4   `X.weight` packed uint8 (numel/2, 1), row-major flat over (out, in);
                        `X.weight.absmax` (one per blocksize weights; uint8 when double-quantized,
                        with `X.weight.nested_absmax` / `nested_quant_map`), `X.weight.quant_map`
                        (the 16 levels), `X.weight.quant_state.bitsandbytes__nf4` (a packed JSON:
                        shape, dtype, blocksize, nested parameters).
    load_in_8bit        `X.weight` int8 (out, in), `X.SCB` float32 (out,) row absmax,
                        `X.weight_format` (ignored).
Each quantized weight reaches the loader as a `QuantizedSlices` (a LazyTensor): the layer's
weight_loader narrows it to this rank's slice, and only that slice is read and dequantized on
the host where the packing allows: int8 rows and columns always; nf4 rows (column-parallel
layers) when the slice starts and ends on a quantization block (row * in_features % blocksize
== 0). nf4 column slices (row-parallel layers) are not contiguous in the flat packing: the rank
reads the whole packed tensor (1/4 of the dense bytes) and keeps its columns. The model's quant
method then requantizes the dense slice with the checkpoint's method. At TP 1 this gives back
the checkpoint's own codes (every block's/row's absmax is one of its values); under TP > 1 a
row-parallel int8 slice gets its own row absmax (slightly finer than the checkpoint's), and nf4
slices are requantized on their own 64-blocks (identical codes when the blocks line up).
fp4 and other quant methods (GPTQ, AWQ, ...) are refused with a one-line error.
"""

from __future__ import annotations

import copy
from typing import Iterator, Optional

import torch

from llmbatch.runtime.layers.weight_utils import LazyTensor, LoadedWeight, materialize, narrow

# Companions of a 4-bit `X.weight`, by the suffix after "X.weight".
NF4_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
             ".quant_state.bitsandbytes__nf4")
FP4_STATE = ".quant_state.bitsandbytes__fp4"


def _as_dict(qc) -> dict:
    return qc if isinstance(qc, dict) else qc.to_dict()


def checkpoint_method(hf_config) -> Optional[str]:
    """'nf4' | 'int8' for a bitsandbytes checkpoint, None for a dense one; anything else
    (another quant method, fp4, fp16 master weights) is a ValueError."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    qc = _as_dict(qc)
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"the checkpoint is quantized with {method!r}; the native runtime loads "
                         f"only bitsandbytes nf4/int8 checkpoints (or dense ones)")
    if qc.get("load_in_4bit"):
        qtype = qc.get("bnb_4bit_quant_type", "fp4")
        if qtype != "nf4":
            raise ValueError(f"the checkpoint is bitsandbytes 4-bit {qtype!r}; only nf4 is "
                             f"supported")
        return "nf4"
    if qc.get("load_in_8bit"):
        if qc.get("llm_int8_has_fp16_weight"):
            raise ValueError("the checkpoint is bitsandbytes 8-bit with llm_int8_has_fp16_weight;"
                             " only int8 weights are supported")
        return "int8"
    raise ValueError("the checkpoint's bitsandbytes quantization_config has neither "
                     "load_in_4bit nor load_in_8bit")


def resolve_method(requested: Optional[str], hf_config) -> tuple[str, bool]:
    """(method to run with, whether the checkpoint is pre-quantized). A pre-quantized
    checkpoint runs with its own method; asking for another one is refused."""
    requested = requested or "none"
    ckpt = checkpoint_method(hf_config) if hf_config is not None else None
    if ckpt is None:
        return requested, False
    if requested not in ("none", ckpt):
        raise ValueError(f"the checkpoint is already quantized with bitsandbytes {ckpt}; "
                         f"quantization.method {requested!r} conflicts: use none or {ckpt}")
    return ckpt, True


def _dtype_name(t: LoadedWeight) -> str:
    """Element type without reading the tensor ('U8', 'I8', 'F32', ... for safetensors)."""
    if isinstance(t, torch.Tensor):
        return {torch.uint8: "U8", torch.int8: "I8"}.get(t.dtype, str(t.dtype))
    return t._slice.get_dtype()


def dequantize_nf4(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """parts: "" (packed weight) and the NF4_PARTS suffixes present -> dense (out, in)."""
    import bitsandbytes.functional as bf

    qs = {k.lstrip("."): v for k, v in parts.items() if k}
    state = bf.QuantState.from_dict(qs, device=torch.device("cpu"))
    # Flat, like BnbLinearMethod: bitsandbytes 0.50's CPU dequantize is wrong for 2-D shapes
    # whose rows are not whole blocks.
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    flat.dtype = torch.float32   # exact (code x absmax); the loader casts (stage_in_float32)
    return bf.dequantize_4bit(parts[""], flat).view(state.shape)


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) and row absmax (out,) -> float32 (out, in)."""
    return weight.float() * (scb.float() / 127.0).unsqueeze(1)


class QuantizedSlices(LazyTensor):
    """One bitsandbytes weight of the checkpoint, dequantized slice by slice (module doc).
    weight: the packed/int8 tensor, unread; stats: its statistics (small, read)."""

    def __init__(self, name: str, method: str, weight: LoadedWeight,
                 stats: dict[str, torch.Tensor]) -> None:
        self.name, self.method, self._weight, self._stats = name, method, weight, stats
        self._absmax = None
        if method == "int8":
            self.shape = torch.Size(weight.shape)
        else:
            import bitsandbytes.functional as bf

            qs = {k.lstrip("."): v for k, v in stats.items()}
            self._state = bf.QuantState.from_dict(qs, device=torch.device("cpu"))
            self.shape = self._state.shape

    def _flat_absmax(self) -> torch.Tensor:
        """float32 absmax per block (double quant: the nested absmax dequantized once)."""
        if self._absmax is None:
            st = self._state
            if st.nested:
                import bitsandbytes.functional as bf

                self._absmax = bf.dequantize_blockwise(st.absmax, st.state2) + st.offset
            else:
                self._absmax = st.absmax
        return self._absmax

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        if self.method == "int8":
            scb = self._stats[".SCB"]
            w = narrow(self._weight, dim, start, size)          # reads only the slice
            return dequantize_int8(w, scb[start:start + size] if dim == 0 else scb)
        import bitsandbytes.functional as bf

        st, cols = self._state, self.shape[1]
        lo, hi = start * cols, (start + size) * cols
        aligned = lo % st.blocksize == 0 and (hi % st.blocksize == 0 or hi == self.shape.numel())
        if dim != 0 or not aligned or (hi - lo) % 2:
            return self.load().narrow(dim, start, size)
        packed = narrow(self._weight, 0, lo // 2, (hi - lo) // 2)  # two codes per byte
        absmax = self._flat_absmax()[lo // st.blocksize: -(-hi // st.blocksize)]
        flat = bf.QuantState(absmax=absmax, shape=torch.Size([hi - lo]), code=st.code,
                             blocksize=st.blocksize, quant_type=st.quant_type,
                             dtype=torch.float32)   # exact, as dequantize_nf4
        return bf.dequantize_4bit(packed, flat).view(size, cols)

    def load(self) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(materialize(self._weight), self._stats[".SCB"])
        return dequantize_nf4(dict(self._stats, **{"": materialize(self._weight)}))


def _needs(parts: dict) -> Optional[set]:
    """Suffixes still missing for a 4-bit group (None: the weight itself is missing)."""
    if "" not in parts:
        return None
    need = {".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"}
    state = parts.get(".quant_state.bitsandbytes__nf4")
    if state is not None:
        from bitsandbytes.utils import unpack_tensor_to_dict

        if "nested_blocksize" in unpack_tensor_to_dict(materialize(state)):
            need |= {".nested_absmax", ".nested_quant_map"}
    return need - parts.keys()


def dequantized_tensors(tensors: Iterator[tuple[str, LoadedWeight]], method: str
                        ) -> Iterator[tuple[str, LoadedWeight]]:
    """(name, tensor) of a pre-quantized checkpoint -> the same names with every quantized
    `X.weight` a QuantizedSlices (dense when read); other tensors pass through unread.
    A group is emitted once all its parts were seen (they may come in any order)."""
    from llmbatch.runtime.layers.quantization import import_bnb

    import_bnb()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if name.endswith(".weight_format") or name.endswith(FP4_STATE):
            if name.endswith(FP4_STATE):
                raise ValueError(f"{name}: bitsandbytes fp4 weights are not supported")
            continue
        if method == "int8" and name.endswith(".SCB"):
            key, part = name[:-len(".SCB")] + ".weight", ".SCB"
        elif method == "nf4" and any(name.endswith(".weight" + s) for s in NF4_PARTS):
            part = next(s for s in NF4_PARTS if name.endswith(".weight" + s))
            key = name[:-len(part)]
        elif name.endswith(".weight") and _dtype_name(t) in ("U8", "I8"):
            key, part = name, ""
        else:
            yield name, t
            continue
        group = pending.setdefault(key, {})
        group[part] = t if part == "" else materialize(t)   # the weight stays unread
        complete = {"", ".SCB"} <= group.keys() if method == "int8" else _needs(group) == set()
        if complete:
            del pending[key]
            weight = group.pop("")
            yield key, QuantizedSlices(key, method, weight, group)
    if pending:
        key, group = next(iter(pending.items()))
        have = ", ".join(sorted(p or "weight" for p in group))
        raise ValueError(f"pre-quantized checkpoint: {key} is incomplete (found {have}); "
                         f"expected the bitsandbytes {method} weight and its statistics")
