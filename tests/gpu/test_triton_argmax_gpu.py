"""triton_argmax.py compiled on CUDA: the CPU cases of tests/runtime/test_triton_argmax.py
(ties across chunks, NaN, -inf rows, -0.0) for float32, bfloat16 and float16 logits, and
greedy_argmax.greedy_argmax taking it for few rows over Llama 3's vocabulary (the tiny test models'
vocabularies are too small to reach this path in the engine tests)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from llmbatch.runtime.triton_argmax import triton_argmax  # noqa: E402
from tests.runtime.test_triton_argmax import _cases  # noqa: E402


@pytest.mark.parametrize("vocab", [300, 5000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_torch_argmax_cuda(vocab, dtype):
    for trial, x in _cases(vocab, 12):
        x = x.to("cuda", dtype)
        assert torch.equal(triton_argmax(x), torch.argmax(x, dim=-1)), trial


def test_greedy_argmax_takes_the_triton_path_on_cuda(monkeypatch):
    from llmbatch.runtime import greedy_argmax as ga, triton_argmax as ta

    calls = []
    real = ta.triton_argmax
    monkeypatch.setattr(ta, "triton_argmax", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(4, 128256, device="cuda")
    assert torch.equal(ga.greedy_argmax(x), torch.argmax(x, dim=-1))
    assert calls == [(4, 128256)]
    monkeypatch.setattr(ga, "TRITON_ARGMAX", False)
    assert torch.equal(ga.greedy_argmax(x), torch.argmax(x, dim=-1))
    assert calls == [(4, 128256)]


def test_start_up_self_check_passes_on_this_gpu():
    """The check ModelRunner runs before it keeps the Triton argmax on (None: it stays on)."""
    from llmbatch.runtime.triton_argmax import self_check

    assert self_check(torch.device("cuda")) is None
