"""EngineConfig.gemv_max_rows (opt-in): steps of up to that many tokens on the gemv kernels
(gemv_linear's multi-row kernel, layers/gemv_rows.py), LM head calls too. On CPU engines the
option is ignored like every Triton path (kernel_paths), so the engine test forces the path on
as tests/runtime/test_llama_skinny.py does, with n-gram speculation at batch 1: its verify
steps of k + 1 tokens are what the option is for."""

from __future__ import annotations

import pytest
import torch

from llmbatch.runtime.config import EngineConfig

pytest.importorskip("triton")

from llmbatch.runtime.models import llama_skinny  # noqa: E402
from tests.runtime.test_llama_skinny import (ATOL, both_paths,  # noqa: E402
                                             greedy_unfused_then_forced, record_gemv_rows,
                                             three_sequences)
from tests.runtime.test_models import load_ours, make_hf_model  # noqa: E402


def test_config_takes_1_to_8_rows():
    assert EngineConfig(model="m").gemv_max_rows == 1
    assert EngineConfig(model="m", gemv_max_rows=8).gemv_max_rows == 8
    for bad in (0, 9, True, 2.0, "4"):
        with pytest.raises(ValueError, match=rf"^gemv_max_rows must be an integer in 1..8, got "
                                             rf"{bad!r}$"):
            EngineConfig(model="m", gemv_max_rows=bad)
    from llmbatch.runtime.config import GEMV_MAX_ROWS
    from llmbatch.runtime.layers import gemv
    assert GEMV_MAX_ROWS == gemv.GEMV_MAX_ROWS


def test_kernel_paths_route_steps_of_up_to_8_tokens(tmp_path, caplog):
    """The CUDA branch on CPU tensors (as test_kernel_paths does): gemv_max_rows 8 without
    skinny_matmul lets steps of <= 8 tokens onto the fused path, all of them on gemv, and the
    LM head takes up to 8 rows on gemv; the default keeps one-token steps only."""
    from llmbatch.runtime.kernel_paths import enable_kernel_paths

    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    inner = model.model
    with caplog.at_level("INFO", logger="llmbatch.runtime.kernel_paths"):
        paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_max_rows=8),
                                    torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.gemv_max_rows) == (True, 8)
    assert (inner.skinny_max_tokens, inner.skinny_gemv_max_rows) == (8, 8)
    assert (model.lm_head.use_gemv, model.lm_head.gemv_max_rows) == (True, 8)
    assert "skinny_gemv on: steps of <= 8 tokens on the gemv kernels" in caplog.messages
    paths = enable_kernel_paths(model, EngineConfig(model="m"), torch.device("cuda"), 1, "none")
    assert (paths.gemv_max_rows, inner.skinny_max_tokens, inner.skinny_gemv_max_rows,
            model.lm_head.gemv_max_rows) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="gemv_max_rows must be in 1..8, got 9"):
        llama_skinny.enable_skinny_matmul(model, gemv_rows=True, gemv_max_rows=9)


def test_multi_token_steps_run_on_gemv_and_match_unfused(tmp_path, monkeypatch):
    """Qwen2 (q/k/v bias) with skinny_matmul and gemv_max_rows 5: a 5-token verify-like step
    and a 3-sequence decode step run every layer's matmuls and the LM head on gemv_linear
    with 5 / 3 rows; a 6-token step stays on skinny_linear. Logits match the unfused path."""
    model = load_ours(make_hf_model("qwen2-gqa-hd32-tied", tmp_path), tmp_path)
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, gemv_max_rows=5)
    gemv_rows = record_gemv_rows(monkeypatch)
    tables, seqs = three_sequences()
    steps = [[(seqs[0], tables[0], 0, 12), (seqs[1], tables[1], 0, 6),
              (seqs[2], tables[2], 0, 4)],
             [(seqs[0], tables[0], 12, 17)],                       # 5 tokens: gemv
             [(seqs[0], tables[0], 17, 18), (seqs[1], tables[1], 6, 7),
              (seqs[2], tables[2], 4, 5)],                         # 3 tokens: gemv
             [(seqs[1], tables[1], 7, 13)]]                        # 6 tokens: skinny_linear
    off, on, _, _ = both_paths(model, steps)
    layers = len(model.model.layers)
    # Layers in the fused pass only; the LM head (set with the gemv layers) in both passes.
    assert sorted(gemv_rows) == sorted([5] * 4 * layers + [3] * 4 * layers + [5, 3] * 2)
    for a, b in zip(off, on):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL)
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0


def test_engine_greedy_tokens_equal_with_verify_steps_on_gemv(llama_setup, monkeypatch):
    """n-gram speculation (k = 4) at batch 1 with the gemv path forced on at gemv_max_rows 8:
    verify steps (here one of 3 tokens: the n-gram lookup found 2 drafts) run on the multi-row
    kernel, and the greedy tokens are the unfused engine's (and so the one-row gemv path's:
    test_llama_skinny's gemv-only engine test)."""
    def force(engine):
        assert llama_skinny.enable_skinny_matmul(engine.runner.model, gemv_rows=True,
                                                 small_steps=False, gemv_max_rows=8)

    (unfused, gemv_rows), calls = greedy_unfused_then_forced(
        llama_setup, monkeypatch, force, 1, 8, max_num_seqs=1, speculative_method="ngram",
        num_speculative_tokens=4)
    assert gemv_rows == unfused
    assert all(len(o) == 8 for o in gemv_rows)
    assert calls and max(calls) <= 5 and any(c > 1 for c in calls), calls
