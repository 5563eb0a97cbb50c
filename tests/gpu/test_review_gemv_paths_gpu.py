"""The gemv start-up check (models/gemv_check.py) on real kernels: in bfloat16, which the CPU
interpreter cannot run, at a K where rounding adds up (1024 / 4096), with each
gemv_weight_prefetch mode (so PREFETCH_L2's inline PTX and, on sm_90+, PDL launches run inside
the check). Its per-element worst-case bound must never fail a correct kernel: a false alarm
turns the default-on gemv layers off on every GPU."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime import pdl  # noqa: E402
from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.kernel_paths import enable_kernel_paths  # noqa: E402
from llmbatch.runtime.layers import gemv  # noqa: E402
from tests.runtime.test_models import load_ours, make_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-layer Qwen2 (biases on q/k/v) of 1B-like widths, saved once."""
    path = tmp_path_factory.mktemp("qwen2-wide")
    hf = make_hf_model("qwen2-gqa-hd32-tied", path, hidden_size=1024, num_attention_heads=8,
                       num_key_value_heads=2, intermediate_size=4096, vocab_size=8192,
                       num_hidden_layers=1)
    return hf, path


@pytest.mark.parametrize("mode", ["off", "tile", "l2", "both"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_check_passes_correct_kernels_in_every_prefetch_mode(checkpoint, dtype, mode):
    hf, path = checkpoint
    model = load_ours(hf, path, dtype=dtype).to("cuda")
    try:
        paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_weight_prefetch=mode),
                                    torch.device("cuda"), 1, "none")
        assert (paths.skinny_gemv, paths.skinny_gemv_error, paths.gemv_weight_prefetch) == \
            (True, None, mode)
        assert model.lm_head.use_gemv is True
        assert int(model.model.skinny_gemv_counters.abs().sum()) == 0
    finally:
        pdl.set_enabled(False)
        gemv.set_weight_prefetch(False)
        gemv.set_weight_prefetch_l2(False)
