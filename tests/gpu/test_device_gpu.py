"""runtime/device.host_to_device on CUDA: lists and numpy arrays (the block tables are numpy)
arrive on the device with their values and dtype. The first H200 run of stop 9 failed every
engine test with "Can't pin tensor constructed from numpy" from the numpy case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from llmbatch.runtime.device import host_to_device  # noqa: E402


@pytest.mark.parametrize("data", ([[1, 2, 3], [4, 5, 6]],
                                  np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32),
                                  np.array([[1, 2, 3, 0], [4, 5, 6, 0]], dtype=np.int64)[:, :3]))
def test_lists_and_numpy_arrays_reach_the_device(data):
    got = host_to_device(data, torch.int32, "cuda")
    torch.cuda.synchronize()
    assert got.device.type == "cuda" and got.dtype == torch.int32
    assert got.cpu().tolist() == np.asarray(data).tolist()
