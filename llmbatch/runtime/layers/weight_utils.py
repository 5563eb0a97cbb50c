"""Checkpoint tensors as seen by a parameter's `weight_loader`.

The loader hands each `weight_loader(param, loaded_weight, shard_id=None)` either a real
`torch.Tensor` (the .bin fallback, tests) or a `LazyTensor` that has read nothing yet. The
loader of a tensor-parallel layer calls `narrow(loaded_weight, dim, start, size)` for its own
slice, so with safetensors a rank reads only the bytes of that slice from disk; a replicated
parameter calls `materialize(loaded_weight)`. Both return plain tensors on the CPU.
"""

from __future__ import annotations

from typing import Union

import torch


class LazyTensor:
    """One tensor of an open safetensors file (`safe_open(..., framework="pt")`), unread."""

    def __init__(self, handle, name: str) -> None:
        self._handle = handle
        self.name = name
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        # The file is memory-mapped: only the elements of the slice are copied out of it.
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + size)
        return self._slice[tuple(index)]

    def load(self) -> torch.Tensor:
        return self._handle.get_tensor(self.name)


LoadedWeight = Union[torch.Tensor, LazyTensor]


def narrow(loaded: LoadedWeight, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/columns [start, start + size) of `dim`, read lazily when possible."""
    if start < 0 or start + size > loaded.shape[dim]:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} has no slice [{start}:{start + size}] "
            f"on dim {dim}; the config does not match the checkpoint")
    # LazyTensor.narrow reads from disk; Tensor.narrow is a view.
    return loaded.narrow(dim, start, size)


def check_shape(loaded: LoadedWeight, expected: tuple, what: str) -> None:
    """The full checkpoint tensor must have the full logical shape: a slice that merely fits
    (e.g. a smaller intermediate_size in the config) would load silently wrong weights."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} does not match the "
                         f"expected {tuple(expected)}; the config does not match the checkpoint")


def materialize(loaded: LoadedWeight) -> torch.Tensor:
    return loaded.load() if isinstance(loaded, LazyTensor) else loaded


def copy_checked(param: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """param.copy_(src) with a readable error instead of a broadcast or a shape crash."""
    if tuple(param.shape) != tuple(src.shape):
        raise ValueError(
            f"{what}: checkpoint shape {tuple(src.shape)} does not match parameter shape "
            f"{tuple(param.shape)}; the config does not match the checkpoint")
    param.copy_(src)


def default_weight_loader(param: torch.nn.Parameter, loaded_weight: LoadedWeight,
                          shard_id=None) -> None:
    """For replicated parameters (norm weights): copy the whole tensor."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter got shard_id={shard_id!r}")
    with torch.no_grad():
        copy_checked(param.data, materialize(loaded_weight), "replicated parameter")
