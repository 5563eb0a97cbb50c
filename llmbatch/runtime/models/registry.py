"""Architecture name -> native model class, and model construction on a device."""

from __future__ import annotations

from typing import Union

import torch

from llmbatch.runtime.models.llama import LlamaForCausalLM

# transformers `architectures[0]` -> (class, variant switch of that class)
_MODELS = {
    "LlamaForCausalLM": (LlamaForCausalLM, "llama"),
    "MistralForCausalLM": (LlamaForCausalLM, "mistral"),
    "Qwen2ForCausalLM": (LlamaForCausalLM, "qwen2"),
    "Qwen3ForCausalLM": (LlamaForCausalLM, "qwen3"),
}
# Used when a config names no architecture (e.g. built in code): model_type -> architecture.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def resolve_architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        archs = [f"model_type={model_type!r}"]
    for arch in archs:
        if arch in _MODELS:
            return arch
    raise ValueError(f"unsupported model architecture {', '.join(archs)}; supported: "
                     f"{', '.join(_MODELS)}")


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported model dtype {dtype}; use one of {', '.join(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported model dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def build_model(hf_config, dtype: Union[str, torch.dtype], device: Union[str, torch.device],
                tp_rank: int = 0, tp_size: int = 1) -> torch.nn.Module:
    """Allocate (uninitialized) parameters of this rank directly on `device`; fill them with
    loader.load_weights. Raises ValueError for an unsupported architecture or config."""
    cls, variant = _MODELS[resolve_architecture(hf_config)]
    with torch.device(device):
        model = cls(hf_config, variant=variant, params_dtype=resolve_dtype(dtype),
                    tp_rank=tp_rank, tp_size=tp_size)
    return model.eval()
