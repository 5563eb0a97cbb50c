"""Resolve the device and dtype an engine runs with; copy small host data to it."""

from __future__ import annotations

import numpy as np
import torch

from llmbatch.runtime.config import EngineConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The dtypes host_to_device builds through numpy (the ones steps copy: ids, rows, temperatures).
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        # A setting this machine cannot honour, not a model that fails to load.
        raise EngineConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise EngineConfigError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def make_current(device: torch.device) -> None:
    """Make an indexed CUDA device (cuda:N) the current one. Triton launches its kernels on
    the current device, not on their tensors' device: without this, an engine on cuda:1 ran
    torch ops there and every Triton kernel on cuda:0 (stop 10 review)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (what checkpoints are trained in), float32 on CPU (exact tests)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def host_to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list (or numpy array) as a tensor on `device`, without waiting for the device.

    torch.tensor(data, device=cuda) copies from pageable memory and synchronizes the stream,
    so the host would wait for all queued work: with async scheduling, for the forward it has
    just launched. On CUDA the data goes through pinned memory with a non_blocking copy (the
    caching host allocator keeps the pinned block until the copy has read it). The host tensor
    is made first and pinned after: torch.tensor(ndarray, pin_memory=True) raises ("Can't pin
    tensor constructed from numpy"), and the block tables arrive as numpy arrays."""
    device = torch.device(device)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if isinstance(data, list) and np_dtype is not None:
        # A list through numpy is ~3x cheaper than torch.tensor(list) (12 vs 4 us for 256
        # ints): a step copies several such lists. np.array copies, so nothing is shared.
        host = torch.from_numpy(np.array(data, dtype=np_dtype))
        if device.type != "cuda":
            return host if device.type == "cpu" else host.to(device)
        return host.pin_memory().to(device, non_blocking=True)
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.as_tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)

