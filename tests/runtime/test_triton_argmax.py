"""triton_argmax.py: the two-launch argmax picks exactly torch.argmax's index (first maximum on
ties, also across chunks; the first NaN; 0 for a row of -inf; -0.0 == 0.0), for float32 and
float16 logits, strided rows, vocabularies below, at and off multiples of the chunk. Under the
Triton interpreter (CPU); tests/gpu runs the engine with it on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the kernels on CPU tensors need TRITON_INTERPRET=1")


def _cases(vocab: int, trials: int):
    g = torch.Generator().manual_seed(vocab)
    for trial in range(trials):
        x = torch.randn(3, vocab, generator=g)
        if trial % 3 == 0 and vocab > 5000:
            x[:, vocab - 7] = 10.0
            x[:, 100] = 10.0                              # a tie across chunks: 100 wins
        if trial % 4 == 1:
            x[1, vocab - 1] = float("nan")
            x[1, vocab // 2] = float("nan")               # the first NaN wins
            x[1, 0] = 50.0                                # ... over a larger value before it
        if trial % 5 == 2:
            x[2] = float("-inf")
        if trial % 6 == 3:
            x = x.round()                                 # many ties inside chunks
        if trial % 7 == 4:
            x[0] = 0.0
            x[0, 3] = -0.0                                # -0.0 == 0.0: index 0 wins
        yield trial, x


@pytest.mark.parametrize("vocab", [300, 1024, 5000, 128256])
def test_equals_torch_argmax(vocab):
    from llmbatch.runtime.triton_argmax import triton_argmax

    for trial, x in _cases(vocab, 6 if vocab < 100000 else 3):
        want = torch.argmax(x, dim=-1)
        got = triton_argmax(x)
        assert got.dtype == torch.int64 and torch.equal(got, want), trial
        assert torch.equal(triton_argmax(x.half()), torch.argmax(x.half(), dim=-1)), trial


def test_strided_rows_empty_batch_and_the_sampler_switch():
    from llmbatch.runtime.greedy_argmax import greedy_argmax
    from llmbatch.runtime.triton_argmax import triton_argmax

    full = torch.randn(2, 3000 + 9, generator=torch.Generator().manual_seed(1))
    x = full[:, :3000]
    assert not x.is_contiguous()
    assert torch.equal(triton_argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(triton_argmax(full.t().contiguous().t()[:, :3000]),
                       torch.argmax(x, dim=-1))           # column stride != 1: copied first
    assert triton_argmax(torch.empty(0, 3000)).shape == (0,)
    with pytest.raises(ValueError, match="empty vocabulary"):
        triton_argmax(torch.empty(2, 0))
    big = torch.randn(1, 20000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy_argmax(big, two_stage=True, use_triton=True),
                       torch.argmax(big, dim=-1))


def test_self_check_passes_and_catches_a_wrong_or_failing_kernel(monkeypatch):
    from llmbatch.runtime import triton_argmax as mod

    cpu = torch.device("cpu")
    assert mod.self_check(cpu, vocab=5000) is None
    assert mod.self_check(cpu, vocab=3000, dtype=torch.float16) is None
    # A kernel taking the last maximum instead of the first: the cross-chunk tie exposes it.
    last_max = lambda x: (x.shape[1] - 1 - torch.argmax(x.flip(1), dim=-1))  # noqa: E731
    monkeypatch.setattr(mod, "triton_argmax", last_max)
    assert mod.self_check(cpu, vocab=5000) == ("1 rows of 5000 float32 logits: rows [0] differ "
                                               "from torch.argmax")

    def broken(x):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(mod, "triton_argmax", broken)
    assert mod.self_check(cpu, vocab=5000) == "1 rows: RuntimeError: no kernel image"


def test_model_runner_turns_the_triton_argmax_off_when_its_check_fails(monkeypatch):
    from types import SimpleNamespace

    from llmbatch.runtime import greedy_argmax, triton_argmax
    from llmbatch.runtime.model_runner import ModelRunner

    monkeypatch.setattr(greedy_argmax, "TRITON_ARGMAX", True)
    cpu_runner = SimpleNamespace(device=torch.device("cpu"))
    assert ModelRunner._check_triton_argmax(cpu_runner) is None      # CPU: no check
    assert greedy_argmax.TRITON_ARGMAX is True
    seen = []
    monkeypatch.setattr(triton_argmax, "self_check",
                        lambda device: seen.append(device) or None)
    cuda_runner = SimpleNamespace(device=torch.device("cuda", 1))
    assert ModelRunner._check_triton_argmax(cuda_runner) is None
    assert seen == [torch.device("cuda", 1)] and greedy_argmax.TRITON_ARGMAX is True
    monkeypatch.setattr(triton_argmax, "self_check", lambda device: "rows [0] differ")
    assert ModelRunner._check_triton_argmax(cuda_runner) == "rows [0] differ"
    assert greedy_argmax.TRITON_ARGMAX is False
    # Once off, later engines in the process skip the check (and stay on torch.argmax).
    assert ModelRunner._check_triton_argmax(cuda_runner) is None
