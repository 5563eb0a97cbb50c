"""ModelRunner.forward_logits picks the sampled rows' hidden states: a plain view of the first n
rows when every token samples (decode, verify: no host-to-device copy, no gather), a gather
otherwise (prompt chunks sample only their last row); the logits equal the model's at those rows either way."""

from __future__ import annotations

import torch

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.step_inputs import StepInputs

BS = 16


def _runner(llama_setup):
    from llmbatch.runtime.model_runner import ModelRunner

    path, _ = llama_setup
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    kv_cache_blocks=16))


def _step(spans, sample_rows):
    s = StepInputs.empty()
    for tokens, start, table in spans:
        s.add_span(tokens, start, table, BS)
    s.sample_rows.extend(sample_rows)
    return s


def _logits_at(runner, s, rows):
    """The model's logits at `rows`, computed directly (same inputs, same cache writes; the
    LM head on exactly those rows, so the matmul has the same shape)."""
    ids, positions, meta = runner._to_device(s)
    with torch.inference_mode():
        hidden = runner.model(ids, positions, runner.kv_caches, meta, runner.attn_backend)
        return runner.model.compute_logits(hidden[rows])


def test_every_row_sampling_takes_a_view_and_others_a_gather(llama_setup, monkeypatch):
    runner = _runner(llama_setup)
    copies = []
    real_h2d = runner._h2d
    # Host lists copied as int64 (block tables travel as numpy int32 arrays).
    monkeypatch.setattr(runner, "_h2d", lambda data, dtype: (
        copies.append(list(data)) if isinstance(data, list) and dtype == torch.long else None)
        or real_h2d(data, dtype))
    # Two sequences, one decode token each after a 3-token prefix; then a verify-like span of 3
    # and a decode token (every row samples); then a 4-token prompt chunk sampling its last
    # row beside a decode token.
    prefill = _step([([5, 6, 7], 0, [0]), ([8, 9, 10], 0, [1])], [2, 5])
    decode = _step([([11], 3, [0]), ([12], 3, [1])], [0, 1])
    verify = _step([([13, 14, 15], 4, [0]), ([16], 4, [1])], [0, 1, 2, 3])
    mixed = _step([([20, 21, 22, 23], 0, [2]), ([17], 5, [1])], [3, 4])
    for s in (prefill, decode, verify, mixed):
        want = _logits_at(runner, s, s.sample_rows)
        copies.clear()
        got = runner.forward_logits(s)
        assert torch.equal(got, want)
        gathered = s.sample_rows in copies
        assert gathered is (s is prefill or s is mixed), s.sample_rows
