"""models/gemv_check.py: the start-up check of the default-on gemv layers passes on correct
kernels (Llama, Qwen2 biases, Qwen3 q/k norms; the kernels run under the Triton interpreter),
names the first launch that is wrong or fails, and kernel_paths turns the layers off then.
With gemv_max_rows > 1 it checks the multi-row launches too and names their row count."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.kernel_paths import enable_kernel_paths  # noqa: E402
from llmbatch.runtime.layers import gemv, gemv_rows  # noqa: E402
from llmbatch.runtime.models import llama_skinny  # noqa: E402
from llmbatch.runtime.models.gemv_check import check_gemv_layers, multi_row_counts  # noqa: E402
from tests.runtime.test_models import load_ours, make_hf_model  # noqa: E402


def gemv_model(name: str, tmp_path):
    model = load_ours(make_hf_model(name, tmp_path), tmp_path)
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, small_steps=False)
    return model


@pytest.mark.parametrize("name", ["llama-gqa-hd32-tied-llama3", "qwen2-gqa-hd32-tied",
                                  "qwen3-gqa-hd128-bias"])
def test_correct_kernels_pass(name, tmp_path):
    model = gemv_model(name, tmp_path)
    assert check_gemv_layers(model) is None
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0


def test_no_gemv_layers_nothing_to_check(tmp_path):
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    assert check_gemv_layers(model) is None


def _dropping(kwarg: str):
    """gemv_linear with one fusion silently left out: a wrong kernel flag."""
    real = gemv.gemv_linear

    def wrong(*args, **kwargs):
        kwargs.pop(kwarg, None)
        return real(*args, **kwargs)
    return wrong


@pytest.mark.parametrize("kwarg,first_wrong", [("norm_weight", "qkv"), ("residual", "o_proj")])
def test_a_missing_fusion_is_named(kwarg, first_wrong, tmp_path, monkeypatch):
    model = gemv_model("llama-gqa-hd32-tied-llama3", tmp_path)
    monkeypatch.setattr(gemv, "gemv_linear", _dropping(kwarg))
    reason = check_gemv_layers(model)
    assert reason is not None and reason.startswith(f"{first_wrong}: max |gemv - torch| = ")


def test_a_launch_failure_is_named(tmp_path, monkeypatch):
    model = gemv_model("llama-gqa-hd32-tied-llama3", tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")
    monkeypatch.setattr(gemv, "gemv_linear", broken)
    assert check_gemv_layers(model) == "qkv: RuntimeError: no kernel image for this device"


def test_a_nan_output_fails(tmp_path, monkeypatch):
    model = gemv_model("llama-gqa-hd32-tied-llama3", tmp_path)
    real = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear",
                        lambda *a, **kw: torch.full_like(real(*a, **kw), float("nan")))
    assert check_gemv_layers(model).startswith("qkv: max |gemv - torch| = nan exceeds ")


@pytest.mark.parametrize("skinny", [False, True])
def test_kernel_paths_turn_the_gemv_layers_off_when_the_check_fails(skinny, tmp_path,
                                                                     monkeypatch, caplog):
    """The CUDA branch on CPU tensors: a failing check leaves one-token steps on the unfused
    layers (or the 16-row skinny tiles with skinny_matmul), says why, and reports it."""
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    monkeypatch.setattr(gemv, "gemv_linear", _dropping("residual"))
    config = EngineConfig(model="m", skinny_matmul=skinny)
    with caplog.at_level("WARNING", logger="llmbatch.runtime.kernel_paths"):
        paths = enable_kernel_paths(model, config, torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.skinny_matmul) == (False, skinny)
    assert paths.skinny_gemv_error.startswith("o_proj: max |gemv - torch| = ")
    inner = model.model
    assert (inner.use_skinny_matmul, inner.skinny_gemv_counters, inner.skinny_max_tokens) == \
        (skinny, None, 16)
    where = "skinny" if skinny else "unfused"
    assert [r.getMessage() for r in caplog.records] == [
        f"skinny_gemv off, one-token steps on the {where} layers: the start-up check of the "
        f"gemv kernels failed: {paths.skinny_gemv_error}"]


def test_engine_stats_report_no_gemv_error_on_cpu(llama_setup):
    from tests.runtime.tiny_models import new_engine

    stats = new_engine(llama_setup, kv_cache_blocks=16).stats()
    assert (stats["skinny_gemv_active"], stats["skinny_gemv_error"]) == (False, None)
    assert stats["gemv_max_rows_active"] == 1


def test_a_wrong_lm_head_gemv_is_named(tmp_path, monkeypatch):
    model = gemv_model("llama-gqa-hd32-tied-llama3", tmp_path)
    assert model.lm_head.use_gemv is True
    head_weight = model.lm_head.weight
    real = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear", lambda x, w, *a, **kw: (
        torch.zeros_like(real(x, w, *a, **kw)) if w is head_weight else real(x, w, *a, **kw)))
    assert check_gemv_layers(model).startswith("lm_head: max |gemv - torch| = ")


def test_lm_head_takes_gemv_for_one_row_only(tmp_path, monkeypatch):
    """ParallelLMHead.use_gemv (set with the gemv layers, cleared by disable): one-row calls on
    layers/gemv.py, equal to F.linear within float32 rounding; wider calls stay on F.linear."""
    model = gemv_model("qwen2-gqa-hd32-tied", tmp_path)
    head = model.lm_head
    calls = []
    real = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear",
                        lambda x, *a, **kw: calls.append(tuple(x.shape)) or real(x, *a, **kw))
    hidden = torch.randn(3, head.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one, three = head(hidden[:1]), head(hidden)
        want = torch.nn.functional.linear(hidden, head.weight).float()
    assert calls == [(1, head.weight.shape[1])]
    torch.testing.assert_close(one, want[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(three, want)
    llama_skinny.disable_skinny_matmul(model)
    assert head.use_gemv is False


@pytest.mark.parametrize("why", ["sharded", "quantized"])
def test_lm_head_keeps_f_linear_when_sharded_or_quantized(why, tmp_path):
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    if why == "sharded":
        model.lm_head.tp_size = 2
    else:
        model.lm_head.quant_method = object()
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, small_steps=False)
    assert model.lm_head.use_gemv is False


# gemv_max_rows = R > 1: the check also runs each launch on R distinct rows (the multi-row
# kernel, layers/gemv_rows.py), the norms' eps-scale row among them, after the one-row ones.

def rows_model(name: str, tmp_path, max_rows: int):
    model = load_ours(make_hf_model(name, tmp_path), tmp_path)
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, small_steps=False,
                                             gemv_max_rows=max_rows)
    return model


def _launch_rows(monkeypatch):
    """Spy on gemv_linear: the row count of every launch, in order."""
    rows, real = [], gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear",
                        lambda x, *a, **kw: rows.append(x.shape[0]) or real(x, *a, **kw))
    return rows


@pytest.mark.parametrize("name,max_rows", [("llama-gqa-hd32-tied-llama3", 2),
                                           ("llama-gqa-hd32-tied-llama3", 5),
                                           ("qwen2-gqa-hd32-tied", 5)])
def test_correct_multi_row_kernels_pass(name, max_rows, tmp_path, monkeypatch):
    """The seven one-row launches as before, then qkv, o_proj, gate_up, down and the LM head
    on max_rows rows."""
    model = rows_model(name, tmp_path, max_rows)
    rows = _launch_rows(monkeypatch)
    assert check_gemv_layers(model, max_rows=max_rows) is None
    assert rows == [1] * 7 + [m for m in multi_row_counts(max_rows) for _ in range(5)]
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0


def test_one_row_check_launches_one_row_only(tmp_path, monkeypatch):
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 1)
    rows = _launch_rows(monkeypatch)
    assert check_gemv_layers(model) is None and check_gemv_layers(model, max_rows=1) is None
    assert rows == [1] * 14


_REAL_GEMV = gemv.gemv_linear


def _wrong_from_row_2(*args, **kwargs):
    """A multi-row kernel that reads row 1's input for every row >= 2 (a row-stride bug): its
    rows 0 and 1 are right."""
    out = _REAL_GEMV(*args, **kwargs)
    if out.shape[0] > 2:
        out[2:] = out[1]
    return out


def test_a_kernel_wrong_from_row_2_is_caught_with_3_rows_only(tmp_path, monkeypatch):
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 3)
    monkeypatch.setattr(gemv, "gemv_linear", _wrong_from_row_2)
    assert check_gemv_layers(model) is None   # gemv_max_rows 1: one-row launches only
    reason = check_gemv_layers(model, max_rows=3)
    assert reason is not None and reason.startswith("qkv (3 rows): max |gemv - torch| = ")
    assert "(row 2, column " in reason


@pytest.mark.parametrize("max_rows,counts", [(1, []), (2, [2]), (3, [3, 2]), (4, [4, 2]),
                                             (5, [5, 4, 2]), (8, [8, 4, 2])])
def test_one_row_count_per_rows_padding(max_rows, counts):
    assert multi_row_counts(max_rows) == counts
    # every step size 2..R pads like one of the counts checked (gemv_rows.rows_of)
    assert ({gemv_rows.rows_of(m) for m in range(2, max_rows + 1)}
            == {gemv_rows.rows_of(m) for m in counts})


def test_a_kernel_wrong_at_a_smaller_padding_is_caught(tmp_path, monkeypatch):
    """Wrong only for calls of 3-4 rows (their ROWS = 4 variant): a step of 3 or 4 tokens at
    gemv_max_rows 5 would run it, so the check must launch it, not only the 5-row one."""
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 5)

    def wrong_at_rows_4(x, *a, **kw):
        out = _REAL_GEMV(x, *a, **kw)
        return out * 1.5 if x.shape[0] in (3, 4) else out
    monkeypatch.setattr(gemv, "gemv_linear", wrong_at_rows_4)
    assert check_gemv_layers(model, max_rows=5).startswith("qkv (4 rows): ")


def test_the_eps_row_is_among_the_multi_row_norm_launches(tmp_path, monkeypatch):
    """Multi-row launches that drop the norm's eps: only the eps-scale row shows it."""
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 4)
    monkeypatch.setattr(gemv, "gemv_linear", lambda x, *a, **kw: _REAL_GEMV(
        x, *a, **dict(kw, eps=0.0) if x.shape[0] > 1 and "eps" in kw else kw))
    reason = check_gemv_layers(model, max_rows=4)
    assert reason is not None and reason.startswith("qkv (4 rows): max |gemv - torch| = ")


def test_a_wrong_multi_row_lm_head_is_named(tmp_path, monkeypatch):
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 2)
    head_weight = model.lm_head.weight
    monkeypatch.setattr(gemv, "gemv_linear", lambda x, w, *a, **kw: (
        _REAL_GEMV(x.flip(0), w, *a, **kw) if w is head_weight and x.shape[0] > 1
        else _REAL_GEMV(x, w, *a, **kw)))   # rows swapped
    assert check_gemv_layers(model, max_rows=2).startswith(
        "lm_head (2 rows): max |gemv - torch| = ")


@pytest.mark.parametrize("max_rows", [1, 3])
def test_kernel_paths_check_the_engines_gemv_max_rows(max_rows, tmp_path, monkeypatch, caplog):
    """The CUDA branch on CPU tensors with the row-2 bug: gemv_max_rows 1 never launches it
    (the gemv layers stay on); 3 fails the check, which names the row count, and only the
    multi-row steps leave the gemv kernels (one-token steps keep them: the one-row launches
    pass)."""
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    monkeypatch.setattr(gemv, "gemv_linear", _wrong_from_row_2)
    config = EngineConfig(model="m", gemv_max_rows=max_rows)
    with caplog.at_level("WARNING"):
        paths = enable_kernel_paths(model, config, torch.device("cuda"), 1, "none")
    if max_rows == 1:
        assert (paths.skinny_gemv, paths.gemv_max_rows, paths.skinny_gemv_error) == \
            (True, 1, None)
        assert caplog.records == []
        return
    assert (paths.skinny_gemv, paths.gemv_max_rows) == (True, 1)
    assert paths.skinny_gemv_error.startswith("qkv (3 rows): max |gemv - torch| = ")
    assert model.model.skinny_gemv_max_rows == 1 and model.model.skinny_max_tokens == 1
    assert model.lm_head.gemv_max_rows == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"gemv_max_rows 3 off, steps of 2-3 tokens on the unfused layers (one-token steps stay "
        f"on the gemv kernels): the start-up check of the multi-row gemv kernel failed: "
        f"{paths.skinny_gemv_error}"]


def test_a_one_row_failure_at_gemv_max_rows_3_turns_the_gemv_layers_off(tmp_path, monkeypatch,
                                                                        caplog):
    model = load_ours(make_hf_model("llama-gqa-hd32-tied-llama3", tmp_path), tmp_path)
    monkeypatch.setattr(gemv, "gemv_linear", lambda *a, **kw: _REAL_GEMV(*a, **kw) * 1.5)
    with caplog.at_level("WARNING"):
        paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_max_rows=3),
                                    torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.gemv_max_rows) == (False, 1)
    assert paths.skinny_gemv_error.startswith("qkv: max |gemv - torch| = ")
    assert (model.model.skinny_gemv_counters, model.model.skinny_max_tokens) == (None, 16)
    assert [r.getMessage() for r in caplog.records] == [
        f"skinny_gemv off, steps of <= 3 tokens on the unfused layers: the start-up check of "
        f"the gemv kernels failed: {paths.skinny_gemv_error}"]


def test_the_check_runs_under_inference_mode(tmp_path, monkeypatch):
    """Its reference math and launches build no autograd graph (9ecfb8e had moved the
    decorator onto multi_row_counts)."""
    model = rows_model("llama-gqa-hd32-tied-llama3", tmp_path, 2)
    modes = []
    monkeypatch.setattr(gemv, "gemv_linear", lambda *a, **kw: modes.append(
        torch.is_inference_mode_enabled()) or _REAL_GEMV(*a, **kw))
    assert check_gemv_layers(model, max_rows=2) is None
    assert modes and all(modes)
