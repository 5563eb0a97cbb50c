"""tests/gpu needs a CUDA device: without one every test collected here is skipped (shown as
skipped, so `pytest tests/gpu` still exits 0 on a CPU-only machine)."""

from __future__ import annotations

import os

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # Hooks in a conftest see the whole session's items; act only on ours.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(_HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (GQA 4/2, head_dim 64) saved to disk: (path, the transformers model)
    for the CUDA-graph tests (test_cuda_graphs.py, test_prefill_graphs_gpu.py)."""
    from tests.runtime.tiny_models import make_model

    path = tmp_path_factory.mktemp("llama-graphs")
    hf = make_model(path, num_heads=4, num_kv_heads=2, head_dim=64, hidden=128)
    return path, hf
