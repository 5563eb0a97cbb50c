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


@pytest.fixture(autouse=True)
def process_switches_off():
    """enable_kernel_paths sets the process-wide PDL and weight-prefetch switches: off after
    each test, so the next one starts from the same state."""
    yield
    pdl.set_enabled(False)
    gemv.set_weight_prefetch(False)
    gemv.set_weight_prefetch_l2(False)


@pytest.mark.parametrize("mode", ["off", "tile", "l2", "both"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_check_passes_correct_kernels_in_every_prefetch_mode(checkpoint, dtype, mode):
    hf, path = checkpoint
    model = load_ours(hf, path, dtype=dtype).to("cuda")
    paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_weight_prefetch=mode),
                                torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.skinny_gemv_error, paths.gemv_weight_prefetch) == \
        (True, None, mode)
    assert model.lm_head.use_gemv is True
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0


@pytest.mark.parametrize("mode", ["off", "tile"])
@pytest.mark.parametrize("max_rows", [5, 8])
def test_the_check_passes_the_multi_row_kernel_in_bf16(checkpoint, max_rows, mode):
    """gemv_max_rows > 1: the check also launches each row padding up to max_rows
    (gemv_check.multi_row_counts); none may be a false alarm in bf16 at these widths."""
    hf, path = checkpoint
    model = load_ours(hf, path, dtype=torch.bfloat16).to("cuda")
    config = EngineConfig(model="m", gemv_weight_prefetch=mode, gemv_max_rows=max_rows)
    paths = enable_kernel_paths(model, config, torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.skinny_gemv_error, paths.gemv_max_rows) == \
        (True, None, max_rows)
    assert model.lm_head.gemv_max_rows == max_rows
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0
