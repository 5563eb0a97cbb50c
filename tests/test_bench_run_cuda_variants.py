"""bench/run.py's CUDA-only A/B variants (--pdl: llmbatch-pdl, EngineConfig.pdl; --skinny-pdl:
llmbatch-skinny-pdl, EngineConfig.skinny_matmul + pdl; --l2-prefetch: llmbatch-l2prefetch,
EngineConfig.l2_prefetch; --skinny-gemv[-pdl]: skinny_matmul + skinny_gemv [+ pdl];
--old-defaults / --no-gemv / --no-pdl: the auto-on skinny_gemv and pdl turned off;
--prev-defaults: stop 19's auto-on rotary_in_attention and gemv_weight_prefetch off): off by
default, skipped with a reason on CPU, and built with their engine overrides on CUDA."""

from __future__ import annotations

import pytest

from bench import llmbatch_runner
from bench import run as bench_run

WORKLOADS = ("W-RANDOM", "W-PREFIX", "W-BATCH1")
# variant -> (flag, argparse dest, CPU skip reason, EngineConfig overrides it asks for)
CASES = {
    "pdl": ("--pdl", "pdl", "PDL runs on CUDA only", {"pdl": True}),
    "skinny-pdl": ("--skinny-pdl", "skinny_pdl", "skinny matmul with PDL runs on CUDA only",
                   {"skinny_matmul": True, "pdl": True}),
    "l2prefetch": ("--l2-prefetch", "l2_prefetch", "L2 prefetch runs on CUDA only",
                   {"l2_prefetch": True}),
    "skinny-gemv": ("--skinny-gemv", "skinny_gemv", "skinny gemv runs on CUDA only",
                    {"skinny_matmul": True, "skinny_gemv": True}),
    "skinny-gemv-pdl": ("--skinny-gemv-pdl", "skinny_gemv_pdl",
                        "skinny gemv with PDL runs on CUDA only",
                        {"skinny_matmul": True, "skinny_gemv": True, "pdl": True}),
    "old-defaults": ("--old-defaults", "old_defaults", "skinny gemv and PDL run on CUDA only",
                     {"skinny_gemv": False, "pdl": False, "rotary_in_attention": False,
                      "gemv_weight_prefetch": "off"}),
    "prev-defaults": ("--prev-defaults", "prev_defaults",
                      "the fused rotary and the gemv layers run on CUDA only",
                      {"rotary_in_attention": False, "gemv_weight_prefetch": "off"}),
    "no-gemv": ("--no-gemv", "no_gemv", "skinny gemv runs on CUDA only", {"skinny_gemv": False}),
    "no-pdl": ("--no-pdl", "no_pdl", "PDL runs on CUDA only", {"pdl": False}),
    "gemv-prefetch": ("--gemv-prefetch", "gemv_prefetch", "the gemv layers run on CUDA only",
                      {"gemv_weight_prefetch": "tile"}),
    "gemv-prefetch-l2": ("--gemv-prefetch-l2", "gemv_prefetch_l2",
                         "the gemv layers run on CUDA only", {"gemv_weight_prefetch": "l2"}),
    "rotary-attn": ("--rotary-in-attention", "rotary_in_attention",
                    "the fused rotary runs on CUDA only", {"rotary_in_attention": True}),
}


@pytest.mark.parametrize("variant", CASES)
def test_rows_are_opt_in_and_skipped_on_cpu(tmp_path, variant):
    flag, dest, reason, _ = CASES[variant]
    assert getattr(bench_run.parse_args([]), dest) is False
    args = bench_run.parse_args([flag])
    assert getattr(args, dest) is True
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, {w: object() for w in WORKLOADS}, "unused", "float32",
                           "cpu", 100, variant=variant)
    skipped = {f"llmbatch-{variant}": {"skipped": reason}}
    assert rec.results["runs"] == {w: skipped for w in WORKLOADS}


def stub_build_engine(monkeypatch) -> dict:
    """build_engine stubbed to fail (the rows record the error); returns the dict its keyword
    arguments (the engine overrides) land in."""
    seen = {}

    def fake_build(model_dir, dtype, device, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stub engine")

    monkeypatch.setattr(llmbatch_runner, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(llmbatch_runner, "build_engine", fake_build)
    return seen


@pytest.mark.parametrize("variant", CASES)
def test_variant_asks_build_engine_for_its_overrides(tmp_path, monkeypatch, variant):
    """On a CUDA device string the variant asks build_engine for its flags (the engine build
    is stubbed to fail, which the variant's rows record as an error)."""
    flag, _, _, overrides = CASES[variant]
    seen = stub_build_engine(monkeypatch)
    args = bench_run.parse_args([flag])
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, {w: object() for w in WORKLOADS}, "unused", "bfloat16",
                           "cuda", 100, variant=variant)
    assert seen == {**overrides, "quantization": "none", "gpu_memory_utilization": 0.5}
    assert rec.results["runs"]["W-BATCH1"] == {
        f"llmbatch-{variant}": {"error": "RuntimeError: stub engine"}}


def test_l2_prefetch_and_pdl_rows_get_a_batch1_profile_only():
    from bench.llmbatch_runner import profile_slices

    workloads = dict.fromkeys(WORKLOADS)
    assert [s[0] for s in profile_slices("llmbatch", workloads)] == [
        "llmbatch_profile", "llmbatch_profile_batch1"]
    # A/B rows whose change shows at batch 1: the batch-1 slice alone.
    for system in ("llmbatch-l2prefetch", "llmbatch-pdl", "llmbatch-skinny-gemv-pdl",
                   "llmbatch-gemv-prefetch", "llmbatch-rotary-attn", "llmbatch-prev-defaults",
                   "llmbatch-no-pdl"):
        assert profile_slices(system, workloads) == [
            (f"{system}_profile_batch1", "W-BATCH1", 1, 128, f"profile_{system}_batch1.txt")]
    assert profile_slices("llmbatch-skinny-pdl", workloads) == []
    assert profile_slices("llmbatch-sync", workloads) == []
    assert profile_slices("llmbatch-l2prefetch", {"W-RANDOM": None}) == []


def test_engine_is_freed_before_cuda_bytes_after_free_is_read(tmp_path, monkeypatch):
    """cuda_bytes_after_free must see the engine gone. (defect: a bound reset_prefix_cache
    kept it alive past `del engine`, so every H200 run since stop 9 reported ~36.9 GB, the
    engine's weights and KV pool, as still allocated after it was freed)"""
    import weakref

    class FakeEngine:
        def reset_prefix_cache(self):
            pass

        def stats(self):
            return {}

    ref = {}

    def fake_build(model_dir, dtype, device, **kwargs):
        engine = FakeEngine()
        ref["engine"] = weakref.ref(engine)
        return engine, 0.0

    monkeypatch.setattr(llmbatch_runner, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(llmbatch_runner, "build_engine", fake_build)
    monkeypatch.setattr(llmbatch_runner, "warm_up", lambda *a: 0.0)
    monkeypatch.setattr(llmbatch_runner, "weight_bytes", lambda e: 0)
    monkeypatch.setattr(llmbatch_runner, "run_workload", lambda e, w: {})
    monkeypatch.setattr("bench.llmbatch_rows._cuda_allocated",
                        lambda: ref["engine"]() is not None)
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(bench_run.parse_args([]), rec, {"W-RANDOM": object()}, "unused",
                           "bfloat16", "cuda", 100)
    assert rec.results["llmbatch_setup"]["cuda_bytes_after_free"] is False


def test_skinny_spec_runs_w_spec_only_with_skinny_matmul(tmp_path, monkeypatch):
    """--skinny-spec (stop 19: a verify step cost 1.39 ms against 0.89 ms a decode step) runs
    W-SPEC, and only W-SPEC, on an engine with skinny_matmul: off by default, skipped with a
    reason on CPU, its overrides asked of build_engine on CUDA."""
    assert bench_run.parse_args([]).skinny_spec is False
    args = bench_run.parse_args(["--skinny-spec"])
    everything = {w: object() for w in (*WORKLOADS, "W-SPEC")}
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, everything, "unused", "float32", "cpu", 100,
                           variant="skinny-spec")
    assert rec.results["runs"] == {
        "W-SPEC": {"llmbatch-skinny-spec": {"skipped": "skinny matmul runs on CUDA only"}}}
    seen = stub_build_engine(monkeypatch)
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, everything, "unused", "bfloat16", "cuda", 100,
                           variant="skinny-spec")
    assert seen == {"skinny_matmul": True, "quantization": "none",
                    "gpu_memory_utilization": 0.5}
    assert rec.results["runs"] == {
        "W-SPEC": {"llmbatch-skinny-spec": {"error": "RuntimeError: stub engine"}}}
    # without W-SPEC among the workloads the variant has nothing to run
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, {w: object() for w in WORKLOADS}, "unused", "bfloat16",
                           "cuda", 100, variant="skinny-spec")
    assert rec.results["runs"] == {}
