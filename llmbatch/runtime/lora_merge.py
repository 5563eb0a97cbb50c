"""A LoRA adapter (PEFT's format) merged into the base weights at load: W' = W + scale * B @ A.

An offline job runs one adapter over every row, so merging once at load costs nothing per step
(vLLM's multi-adapter path pays a LoRA matmul per layer per step to serve many adapters at
once, which a batch job does not need). The checkpoint stream (loader.iterate_checkpoint)
passes through merge_stream: a tensor the adapter targets is read whole, merged in float32,
cast back to its dtype and handed on; the model's weight loaders then slice it per
tensor-parallel rank as any other tensor, and quantization (int8/nf4) applies to the merged
weights.

Adapter folder (peft's save_pretrained): adapter_config.json and adapter_model.safetensors
(or adapter_model.bin), tensors named
    base_model.model.<base tensor name without .weight>.lora_A.weight   (r, in_features)
    base_model.model.<base tensor name without .weight>.lora_B.weight   (out_features, r)
scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). What is refused, each with one
line: DoRA, per-module rank or alpha patterns, trained biases, modules_to_save (full copies of
layers), embedding LoRA, fan_in_fan_out layouts, and an adapter whose targets the checkpoint
does not have.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from llmbatch.runtime.layers.weight_utils import LoadedWeight, materialize

_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter cannot be merged (one line; the job layer makes it an invalid job naming
    `job_key`, the job-file key the adapter comes from)."""

    job_key = "model.lora"


@dataclass
class Adapter:
    path: str
    scale: float
    # base tensor name (e.g. model.layers.0.self_attn.q_proj.weight) -> (A (r, in), B (out, r))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _config(path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter {path!r} is not a directory")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"LoRA adapter {path!r} has no adapter_config.json (a PEFT "
                           f"save_pretrained folder is expected)") from None
    except ValueError as exc:
        raise AdapterError(f"LoRA adapter {cfg_path}: not JSON ({exc})") from None


def _check_supported(path: str, cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {path!r}: peft_type {cfg['peft_type']!r}; only LORA "
                           f"adapters can be merged")
    refusals = [("use_dora", "DoRA"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                ("modules_to_save", "modules_to_save (full copies of layers)"),
                ("fan_in_fan_out", "fan_in_fan_out weights")]
    for key, what in refusals:
        if cfg.get(key):
            raise AdapterError(f"LoRA adapter {path!r} uses {what}, which llmbatch does not "
                               f"merge")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {path!r} trains biases (bias: {cfg['bias']!r}), "
                           f"which llmbatch does not merge")


def _tensors(path: str) -> dict[str, torch.Tensor]:
    safe = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(safe):
        from safetensors.torch import load_file
        return load_file(safe)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise AdapterError(f"LoRA adapter {path!r} has no adapter_model.safetensors (or .bin)")


def read_adapter(path: str) -> Adapter:
    """Read and check a PEFT LoRA adapter folder (raises AdapterError)."""
    cfg = _config(path)
    _check_supported(path, cfg)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"LoRA adapter {path!r}: adapter_config.json needs an integer r >= 1 "
                           f"and a lora_alpha")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _tensors(path).items():
        if "lora_embedding_" in name:
            raise AdapterError(f"LoRA adapter {path!r} adapts an embedding ({name}), which "
                               f"llmbatch does not merge")
        for half in ("A", "B"):
            marker = f".lora_{half}."
            if marker in name:
                base = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
                base = base.split(marker)[0] + ".weight"
                halves.setdefault(base, {})[half] = tensor
                break
        else:
            raise AdapterError(f"LoRA adapter {path!r}: unexpected tensor {name!r}")
    pairs = {}
    for base, ab in halves.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise AdapterError(f"LoRA adapter {path!r}: {base} needs lora_A (r, in) and "
                               f"lora_B (out, r)")
        pairs[base] = (ab["A"], ab["B"])
    if not pairs:
        raise AdapterError(f"LoRA adapter {path!r} holds no LoRA weights")
    return Adapter(path, scale, pairs)


def merge_stream(stream: Iterable[tuple[str, LoadedWeight]],
                 adapter: Adapter) -> Iterator[tuple[str, LoadedWeight]]:
    """The checkpoint's (name, tensor) stream with the adapter's deltas merged in; raises
    AdapterError at the end when a target never came by (the wrong base model)."""
    merged = set()
    for name, tensor in stream:
        pair = adapter.pairs.get(name)
        if pair is not None:
            a, b = pair
            w = materialize(tensor)
            if w.shape != (b.shape[0], a.shape[1]):
                raise AdapterError(f"LoRA adapter {adapter.path!r}: {name} is {tuple(w.shape)} "
                                   f"in the checkpoint, the adapter's delta "
                                   f"{(b.shape[0], a.shape[1])}; is it this model's adapter?")
            delta = (b.float() @ a.float()) * adapter.scale       # (out, in)
            tensor = (w.float() + delta).to(w.dtype)
            merged.add(name)
        yield name, tensor
    missing = sorted(set(adapter.pairs) - merged)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterError(f"LoRA adapter {adapter.path!r} targets {missing[0]}{more}, which "
                           f"the checkpoint does not have; is it this model's adapter?")
