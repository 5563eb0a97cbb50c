"""triton_kernels/split_reduce.py: split-KV partials merged inside the attention kernel
(TritonAttentionBackend(fused_split_reduce=True)) give the second launch's output to fp32
rounding, make no second launch, and leave every counter at zero for the next launch (a
captured graph replays on the same counters). The forward cases themselves (fused variants of
every split case) are in test_triton_attention.py. CPU, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.test_triton_attention import _INTERPRETED, make_case, run_both

pytestmark = pytest.mark.skipif(not _INTERPRETED,
                                reason="runs under TRITON_INTERPRET=1 on CPU; tests/gpu: CUDA")


def _backend(**kw):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(num_kv_splits=4, tile_n=16, **kw)


def test_fused_merge_equals_the_second_launch_and_leaves_counters_zero(monkeypatch):
    import importlib

    # The module (the package re-exports its launcher under the same name).
    pa = importlib.import_module("llmbatch.runtime.attention.triton_kernels.paged_attention")

    spans = [(300, 1), (17, 1), (0, 1), (129, 5)]
    case = make_case(spans, 8, 2, 64, 16, torch.float32, seed=4)
    unfused, _ = run_both(case, _backend())
    fused_backend = _backend(fused_split_reduce=True)
    monkeypatch.setattr(pa, "_reduce_splits_kernel", None)   # a second launch would raise
    fused, _ = run_both(case, fused_backend)
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-6)
    counters = fused_backend._split_counters[torch.device("cpu")]
    assert len(counters) == 1 and counters[0].numel() == 4096
    assert int(counters[0].abs().sum()) == 0
    # Again on the same counters: the same output (the counts started from zero again).
    again, _ = run_both(case, fused_backend)
    assert torch.equal(again, fused) and int(counters[0].abs().sum()) == 0


def test_counters_grow_for_a_larger_launch_and_keep_the_old_tensor():
    from llmbatch.runtime.attention.triton_kernels.paged_attention import split_counter_slots

    backend = _backend(fused_split_reduce=True)
    cpu = torch.device("cpu")
    small = backend._counters(cpu, 10)
    assert backend._counters(cpu, 4096) is small
    big = backend._counters(cpu, 5000)
    assert big.numel() == 5000 and backend._split_counters[cpu] == [small, big]
    # A 2-token-tile decode batch of 3 sequences, 8 KV heads: (6 // 2 + 3) tiles x 8 heads.
    assert split_counter_slots(6, 3, 8, 2) == 48


def test_short_counters_are_refused():
    from llmbatch.runtime.attention.triton_kernels.paged_attention import paged_attention

    case = make_case([(40, 1), (20, 1)], 4, 2, 32, 16, torch.float32)
    # (2 tokens // 1 + 2 sequences) query tiles x 2 KV heads = 8 counters.
    with pytest.raises(ValueError, match="split_counters holds 3 slots, the launch needs 8"):
        paged_attention(torch.empty_like(case.query), case.query, case.k_cache, case.v_cache,
                        case.meta.block_tables, case.meta.seq_lens, case.meta.query_start_loc,
                        0.1, block_q=1, block_m=16, tile_n=16, num_splits=2,
                        split_counters=torch.zeros(3, dtype=torch.int32))
