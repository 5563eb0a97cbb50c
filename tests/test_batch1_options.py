"""bench/batch1_options.py on a tiny Llama built on the CPU (no weights, no engine): the
combined-winners row applies its options in order and undoes them in reverse, and the engine
is then exactly as before, also when two of its options save the same state (the gemv and PDL
flips both save the skinny/gemv fields)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
tf = pytest.importorskip("transformers")

from bench.batch1_options import DEFAULTS, WINNERS, combine_winners, options  # noqa: E402
from llmbatch.runtime import pdl  # noqa: E402
from llmbatch.runtime.layers.embedding import ParallelLMHead  # noqa: E402
from llmbatch.runtime.models import build_model  # noqa: E402
from llmbatch.runtime.models.llama import LlamaModel  # noqa: E402
from llmbatch.runtime.models.llama_skinny import enable_skinny_matmul  # noqa: E402

FIELDS = ("use_skinny_matmul", "skinny_max_tokens", "skinny_pdl", "skinny_gemv_counters")


def _engine():
    config = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512)
    model = build_model(config, torch.float32, "cpu")
    # The gemv layers on, as kernel_paths sets them on a CUDA engine (CPU tensors here: the
    # flip only reads and writes the module fields).
    assert enable_skinny_matmul(model, gemv_rows=True, small_steps=False)
    return SimpleNamespace(runner=SimpleNamespace(model=model))


def _state(engine):
    """Every field the flips touch, by identity for the counters tensor."""
    modules = engine.runner.model.modules
    state = [tuple(id(v) if isinstance(v, torch.Tensor) else v
                   for v in (getattr(m, f) for f in FIELDS))
             for m in modules() if isinstance(m, LlamaModel)]
    state += [h.use_gemv for h in modules() if isinstance(h, ParallelLMHead)]
    return state


def _row(option, tpot):
    return {"option": option, "tpot_s": tpot, "num_errors": 0, "num_wrong_lengths": 0}


def test_winners_with_the_gemv_and_pdl_flips_restore_the_engine(monkeypatch):
    monkeypatch.setattr(pdl, "_enabled", False)
    engine = _engine()
    before = _state(engine)
    assert before[0][3] is not None and before[-1] is True     # gemv counters, head gemv
    opts = options()
    rows = [_row(DEFAULTS, 1.0), _row("skinny gemv flipped", 0.8), _row("PDL flipped", 0.9)]
    label, apply, undo = combine_winners(rows, opts)
    assert label == WINNERS
    detail = apply(engine, torch.device("cpu"))
    assert detail == ("skinny gemv flipped (off (engine default on)) + "
                      "PDL flipped (needs sm_90 CUDA: not applied)")
    assert _state(engine) != before                              # the gemv flip took effect
    undo(engine)
    assert _state(engine) == before
    assert pdl.enabled() is False


def test_each_flip_alone_restores_the_engine(monkeypatch):
    monkeypatch.setattr(pdl, "_enabled", False)
    engine = _engine()
    before = _state(engine)
    by_label = {o[0]: o for o in options()}
    for label in ("skinny gemv flipped", "PDL flipped"):
        _, apply, undo = by_label[label]
        apply(engine, torch.device("cpu"))
        undo(engine)
        assert _state(engine) == before, label


def test_rotary_in_attention_flip_turns_the_backend_switch_and_back():
    """The row flips TritonAttentionBackend.rotary_in_attention where the model has the fused
    rotary (CUDA; set by hand here) and puts it back; without it the row is not applied."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.models.llama import LlamaAttention

    engine = _engine()
    engine.runner.attn_backend = TritonAttentionBackend()
    _, apply, undo = {o[0]: o for o in options()}["rotary in attention flipped"]
    assert apply(engine, torch.device("cpu")) == (
        "needs the triton backend and the fused rotary (CUDA): not applied")
    undo(engine)
    assert engine.runner.attn_backend.rotary_in_attention is False
    for m in engine.runner.model.modules():
        if isinstance(m, LlamaAttention):
            m.use_fused_rotary = True
    assert apply(engine, torch.device("cpu")) == "on (engine default off)"
    assert engine.runner.attn_backend.rotary_in_attention is True
    undo(engine)
    assert engine.runner.attn_backend.rotary_in_attention is False


def test_weight_prefetch_row_flips_the_switch_either_way(monkeypatch):
    """Stop 19 made the first-tile prefetch an engine default: the row turns it off there,
    on where it is off, and puts the switch back."""
    from llmbatch.runtime.layers import gemv

    engine = _engine()
    _, apply, undo = {o[0]: o for o in options()}["gemv weights before the PDL wait"]
    for default in (True, False):
        monkeypatch.setattr(gemv, "_weight_prefetch", default)
        assert apply(engine, torch.device("cpu")) == (
            "off (engine default on)" if default else "on (engine default off)")
        assert gemv.weight_prefetch_enabled() is not default
        undo(engine)
        assert gemv.weight_prefetch_enabled() is default


def test_stop17_tiles_row_swaps_the_gemv_table_and_back():
    """The row makes pick_config answer stop 17's single 16 x 512 p3 row for every 1B shape
    (gemv_linear picks at each launch, so bench_batch1's recapture takes it) and undo puts
    stop 19's per-shape rows back."""
    from llmbatch.runtime.layers import gemv

    shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
    before = [gemv.pick_config(n_w, k) for n_w, k in shapes]
    assert len(set(before)) > 1
    engine = _engine()
    _, apply, undo = {o[0]: o for o in options()}["gemv tiles of stop 17"]
    assert apply(engine, torch.device("cpu")) == "stop 17's table: 16x512 w4 p3 on every shape"
    assert {gemv.pick_config(n_w, k) for n_w, k in shapes} == {gemv.GemvConfig(
        block_n=16, block_k=512, num_warps=4, split_k=1, num_stages=3)}
    undo(engine)
    assert [gemv.pick_config(n_w, k) for n_w, k in shapes] == before


def test_argmax_in_torch_row_turns_the_triton_argmax_off_and_back(monkeypatch):
    """The flag lives in runtime/greedy_argmax.py since it moved out of sampler.py; a row that
    still set sampler.TRITON_ARGMAX would have measured the defaults twice."""
    from llmbatch.runtime import greedy_argmax

    monkeypatch.setattr(greedy_argmax, "TRITON_ARGMAX", True)
    _, apply, undo = {o[0]: o for o in options(all_rows=True)}["argmax in torch"]
    apply(None, torch.device("cpu"))
    assert greedy_argmax.TRITON_ARGMAX is False
    undo(None)
    assert greedy_argmax.TRITON_ARGMAX is True
