"""Review of the gemv paths (cd4a3df, 884a424, 60573a6, f95c664, 93823c5): the start-up check
runs the kernels the engine will launch (with gemv_weight_prefetch's switches) and its
tolerance catches a wrong bias, eps or scale, not only a wrong row or flag."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.kernel_paths import enable_kernel_paths  # noqa: E402
from llmbatch.runtime.layers import gemv  # noqa: E402
from llmbatch.runtime.models import llama_skinny  # noqa: E402
from llmbatch.runtime.models.gemv_check import check_gemv_layers  # noqa: E402
from tests.runtime.test_models import load_ours, make_hf_model  # noqa: E402

LLAMA, QWEN2 = "llama-gqa-hd32-tied-llama3", "qwen2-gqa-hd32-tied"


@pytest.fixture
def restored_switches(monkeypatch):
    """gemv's process-wide prefetch switches as they were before the test."""
    monkeypatch.setattr(gemv, "_weight_prefetch", gemv._weight_prefetch)
    monkeypatch.setattr(gemv, "_weight_prefetch_l2", gemv._weight_prefetch_l2)


def switches() -> tuple[bool, bool]:
    return gemv.weight_prefetch_enabled(), gemv.weight_prefetch_l2_enabled()


def gemv_model(name: str, tmp_path, dtype=torch.float32):
    model = load_ours(make_hf_model(name, tmp_path), tmp_path, dtype=dtype)
    assert llama_skinny.enable_skinny_matmul(model, gemv_rows=True, small_steps=False)
    return model


# -- the check launches what the engine launches ------------------------------------------------

@pytest.mark.usefixtures("restored_switches")
@pytest.mark.parametrize("mode,want", [("off", (False, False)), ("tile", (True, False)),
                                       ("l2", (False, True)), ("both", (True, True))])
def test_start_up_check_runs_with_the_engines_weight_prefetch(mode, want, tmp_path,
                                                               monkeypatch):
    """The CUDA branch on CPU tensors: every launch of the check sees the switches the engine's
    decode steps will see (before: the check ran with both off, then the mode was set, so the
    PREFETCH_W / PREFETCH_L2 specialisations were never checked)."""
    model = load_ours(make_hf_model(LLAMA, tmp_path), tmp_path)
    seen = []
    real = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear",
                        lambda *a, **kw: seen.append(switches()) or real(*a, **kw))
    paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_weight_prefetch=mode),
                                torch.device("cuda"), 1, "none")
    assert seen == [want] * 7   # qkv, o_proj, gate_up, down, the two eps rows, lm_head
    assert (paths.skinny_gemv, paths.skinny_gemv_error, paths.gemv_weight_prefetch) == \
        (True, None, mode)
    assert switches() == want


@pytest.mark.usefixtures("restored_switches")
def test_a_kernel_wrong_only_with_the_weight_prefetch_turns_the_gemv_layers_off(tmp_path,
                                                                                 monkeypatch):
    """A PREFETCH_W specialisation that computes a wrong row: the engine falls back to the
    unfused layers (and the LM head to F.linear) with both switches off, and says why."""
    model = load_ours(make_hf_model(LLAMA, tmp_path), tmp_path)
    real = gemv.gemv_linear

    def wrong_with_prefetch(*a, **kw):
        out = real(*a, **kw)
        return out * 2 if gemv.weight_prefetch_enabled() else out
    monkeypatch.setattr(gemv, "gemv_linear", wrong_with_prefetch)
    paths = enable_kernel_paths(model, EngineConfig(model="m", gemv_weight_prefetch="tile"),
                                torch.device("cuda"), 1, "none")
    assert (paths.skinny_gemv, paths.gemv_weight_prefetch) == (False, "off")
    assert paths.skinny_gemv_error.startswith("qkv: max |gemv - torch| = ")
    assert paths.skinny_gemv_error.endswith(" (gemv_weight_prefetch tile)")
    assert switches() == (False, False)
    assert (model.model.use_skinny_matmul, model.model.skinny_gemv_counters,
            model.lm_head.use_gemv) == (False, None, False)


# -- the tolerance catches wrong values, not only wrong rows ------------------------------------

def _mutated(real, what: str, model):
    """gemv_linear with one plausible kernel bug; `what` names it."""
    layer = model.model.layers[0]

    def launch(x, w, bias=None, **kw):
        if what == "half bias" and bias is not None:
            bias = bias * 0.5
        if what == "eps 0" and "eps" in kw:
            kw["eps"] = 0.0
        if what == "eps 10x" and kw.get("gate_up"):
            kw["eps"] = kw["eps"] * 10
        out = real(x, w, bias, **kw)
        scaled = {"o_proj 1%": layer.self_attn.o_proj.weight,
                  "down 1%": layer.mlp.down_proj.weight, "lm_head 1%": model.lm_head.weight}
        return out * 1.01 if scaled.get(what) is w else out
    return launch


@pytest.mark.parametrize("name,what,first_wrong", [
    (QWEN2, "half bias", "qkv"),
    (LLAMA, "eps 0", "qkv at the norm's eps"),
    (LLAMA, "eps 10x", "gate_up at the norm's eps"),
    (LLAMA, "o_proj 1%", "o_proj"),
    (LLAMA, "down 1%", "down"),
    (LLAMA, "lm_head 1%", "lm_head"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_check_catches_a_wrong_bias_eps_or_scale(name, what, first_wrong, dtype, tmp_path,
                                                     monkeypatch):
    """Each of these passed the check's former bound (3 % of max |y| + 1e-3)."""
    model = gemv_model(name, tmp_path, dtype)
    monkeypatch.setattr(gemv, "gemv_linear", _mutated(gemv.gemv_linear, what, model))
    reason = check_gemv_layers(model)
    assert reason is not None and reason.startswith(f"{first_wrong}: max |gemv - torch| = "), \
        reason


@pytest.mark.parametrize("name", [LLAMA, QWEN2, "qwen3-gqa-hd128-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_correct_kernels_pass_the_tightened_check(name, dtype, tmp_path):
    """No false alarm from the per-element bound: the real kernels, every case, both dtypes
    the interpreter runs, counters left zero."""
    model = gemv_model(name, tmp_path, dtype)
    assert model.lm_head.use_gemv is True
    assert check_gemv_layers(model) is None
    assert int(model.model.skinny_gemv_counters.abs().sum()) == 0


def test_the_check_reference_ignores_tf32(tmp_path, monkeypatch):
    """The reference sums float32 products itself: a process that allows TF32 / reduced
    precision matmuls (as pipelines often do) changes nothing. On CPU F.linear is exact
    float32 anyway, so F.linear is poisoned here: the check must not use it."""
    model = gemv_model(LLAMA, tmp_path)
    import llmbatch.runtime.models.gemv_check as gc

    def no_linear(*a, **kw):
        raise AssertionError("the reference used F.linear")
    monkeypatch.setattr(gc.F, "linear", no_linear)
    assert check_gemv_layers(model) is None


# -- PREFETCH_L2 never reaches the interpreter ---------------------------------------------------

@pytest.mark.usefixtures("poisoned_empty")
def test_l2_prefetch_is_off_in_the_interpreter_even_for_cuda_tensors(monkeypatch):
    """TRITON_INTERPRET=1 on a GPU machine runs CUDA tensors through the interpreter, where
    _l2_prefetch_on says yes (a CUDA device) but inline asm raises NotImplementedError; the
    launch must drop PREFETCH_L2 there. Simulated on CPU by what _l2_prefetch_on answers for a
    CUDA tensor."""
    assert gemv._INTERPRETED is True   # these tests run the kernels in the interpreter
    launched = []
    kernel = gemv._gemv_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["PREFETCH_L2"])
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(gemv, "_gemv_kernel", Recorder())
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 64, generator=gen), torch.randn(32, 64, generator=gen)
    want = gemv.gemv_linear(x, w, prefetch_l2=False)
    monkeypatch.setattr(gemv, "_l2_prefetch_on", lambda device, prefetch_l2: True)
    got = gemv.gemv_linear(x, w, prefetch_l2=True)
    assert launched == [False, False]
    assert torch.equal(got, want)
