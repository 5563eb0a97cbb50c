"""Checkpoint loading: resolve a model path, stream its tensors into a native model.

Each checkpoint tensor goes to the `weight_loader` of the parameter that owns it, which copies
only this rank's slice. safetensors files are opened with `safe_open` and tensors are handed
over unread (`LazyTensor`), so a rank reads only the bytes of its slice and the whole checkpoint
never sits in host memory. Fused parameters (qkv_proj, gate_up_proj) are filled part by part
through the model's `packed_modules_mapping`.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch
from torch import nn

from llmbatch.hub_names import looks_like_hub_id
from llmbatch.one_line import one_line
from llmbatch.runtime.layers.weight_utils import LazyTensor, LoadedWeight, default_weight_loader

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class ModelNotFoundError(OSError):
    """`model` is neither a local directory nor a Hub model this machine can fetch (offline,
    unknown or gated repo, huggingface_hub missing). An OSError like a missing directory: the
    user named a model that is not there, not a failure of the runtime (the job runner turns
    OSError into a one-line invalid-job error, exit 2)."""


def resolve_model_path(model: str) -> str:
    """A local checkpoint directory as is; otherwise a Hugging Face Hub id, fetched with
    snapshot_download (from the local HF cache first, then the network)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    if not looks_like_hub_id(model):   # the rule of llmbatch/hub_names.py
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"model {model!r} is not a local directory and huggingface_hub "
                                 f"is not installed to download it") from None
    # Configs, tokenizer files and safetensors; .bin only when a repo has no safetensors.
    patterns = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        try:
            local = snapshot_download(model, allow_patterns=patterns, local_files_only=True)
        except Exception:
            local = snapshot_download(model, allow_patterns=patterns)
        if not glob.glob(os.path.join(local, "*.safetensors")):
            local = snapshot_download(model, allow_patterns=patterns + ["*.bin"])
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise ModelNotFoundError(f"model {model!r} is not a local directory and could not be "
                                 f"fetched from the Hugging Face Hub "
                                 f"({one_line(e, first_line=True, with_type=True)})") from None
    return local


def load_hf_config(model_path: str, trust_remote_code: bool = False):
    """transformers' config of the checkpoint at `model_path` (a resolved local directory).
    A config.json that transformers refuses is the user's input, whatever transformers raises
    for it (its validators raise ZeroDivisionError for num_attention_heads: 0, for instance):
    a ValueError naming the file. OSError (no config.json, unreadable) passes unchanged."""
    from transformers import AutoConfig

    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{model_path} has no config.json (not a model checkpoint?)")
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except OSError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or "no detail"
        raise ValueError(f"{config_file} is not a valid model config: {type(exc).__name__}: "
                         f"{reason}") from exc


def max_positions(hf_config) -> int:
    """The context length a transformers config declares (max_position_embeddings), 2048 for
    a config without one."""
    return getattr(hf_config, "max_position_embeddings", None) or 2048


def checkpoint_files(checkpoint_dir: str) -> tuple[str, list[str]]:
    """("safetensors" | "bin", files in load order). Prefers safetensors; honours index files."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    for kind, index in (("safetensors", SAFE_INDEX), ("bin", BIN_INDEX)):
        index_path = os.path.join(checkpoint_dir, index)
        if os.path.exists(index_path):
            with open(index_path) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(checkpoint_dir, n) for n in names]
            missing = [n for n, p in zip(names, files) if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"{index} lists missing shard(s): {', '.join(missing)}")
            return kind, files
        if kind == "safetensors":
            files = sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
            # Mistral repos also ship consolidated.safetensors (original names, same weights).
            hf_files = [p for p in files if not os.path.basename(p).startswith("consolidated")]
            if hf_files or files:
                return kind, hf_files or files
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "pytorch_model*.bin")))
    if files:
        return "bin", files
    raise FileNotFoundError(f"no weights found in {checkpoint_dir!r}: expected *.safetensors "
                            f"(or {SAFE_INDEX}) or pytorch_model*.bin")


def iterate_checkpoint(checkpoint_dir: str) -> Iterator[tuple[str, LoadedWeight]]:
    """(name, tensor) over all files; safetensors tensors stay unread until sliced."""
    from safetensors import safe_open

    kind, files = checkpoint_files(checkpoint_dir)
    for path in files:
        if kind == "safetensors":
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, LazyTensor(handle, name)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def _target(name: str, mapping: dict) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, shard id), matching whole name components, e.g.
    model.layers.3.self_attn.k_proj.weight -> (model.layers.3.self_attn.qkv_proj.weight, 'k')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in mapping:
            fused, shard_id = mapping[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard_id
    return name, None


def _expected_loads(params: dict, mapping: dict) -> set[tuple[str, object]]:
    """(param name, shard id) pairs a complete checkpoint must provide."""
    shards_of: dict[str, list] = {}
    for fused, shard_id in mapping.values():
        shards_of.setdefault(fused, []).append(shard_id)
    expected = set()
    for pname in params:
        module = pname.split(".")[-2] if "." in pname else ""
        for shard_id in shards_of.get(module, [None]):
            expected.add((pname, shard_id))
    return expected


def load_weights(model: nn.Module, checkpoint_dir: str, tensors=None) -> None:
    """Fill every parameter of `model` from the checkpoint; raise if any stays unloaded or if
    the checkpoint holds a tensor the model does not know (a config/checkpoint mismatch).
    tensors: (name, tensor) pairs to load instead of iterate_checkpoint(checkpoint_dir)
    (a pre-quantized checkpoint's dequantized stream)."""
    params = dict(model.named_parameters())  # tied weights appear once
    mapping = getattr(model, "packed_modules_mapping", {})
    skip = getattr(model, "skip_checkpoint_tensor", lambda name: False)
    loaded: set[tuple[str, object]] = set()
    for name, tensor in (iterate_checkpoint(checkpoint_dir) if tensors is None else tensors):
        if skip(name):
            continue
        pname, shard_id = _target(name, mapping)
        param = params.get(pname)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of "
                             f"{type(model).__name__}; does the config match the checkpoint?")
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"loading {name!r}: {e}") from None
        loaded.add((pname, shard_id))
    missing = sorted(f"{p}[{s}]" if s is not None else p
                     for p, s in _expected_loads(params, mapping) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {checkpoint_dir!r} has no weights for "
                         f"{', '.join(missing[:5])}{more}")
    # Quantization seam: a layer may now convert its (rank-local) weights.
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(module)
