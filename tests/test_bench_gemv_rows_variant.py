"""bench.run --gemv-rows8 (bench/variants.py): W-SPEC and W-BATCH1, and nothing else, on an
engine with EngineConfig.gemv_max_rows 8; off by default, skipped with a reason on the CPU."""

from __future__ import annotations

from bench import run as bench_run
from tests.test_bench_run_cuda_variants import WORKLOADS, stub_build_engine

SYSTEM = "llmbatch-gemv-rows8"


def _rows(tmp_path, device: str) -> dict:
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(bench_run.parse_args(["--gemv-rows8"]), rec,
                           {w: object() for w in (*WORKLOADS, "W-SPEC")}, "unused",
                           "float32" if device == "cpu" else "bfloat16", device, 100,
                           variant="gemv-rows8")
    return rec.results["runs"]


def test_gemv_rows8_runs_w_spec_and_w_batch1_with_gemv_max_rows_8(tmp_path, monkeypatch):
    assert bench_run.parse_args([]).gemv_rows8 is False
    skipped = {SYSTEM: {"skipped": "the gemv layers run on CUDA only"}}
    assert _rows(tmp_path, "cpu") == {"W-BATCH1": skipped, "W-SPEC": skipped}
    seen = stub_build_engine(monkeypatch)
    failed = {SYSTEM: {"error": "RuntimeError: stub engine"}}
    assert _rows(tmp_path, "cuda") == {"W-BATCH1": failed, "W-SPEC": failed}
    assert seen == {"gemv_max_rows": 8, "quantization": "none", "gpu_memory_utilization": 0.5}


class _Engine:
    def __init__(self, stats: dict):
        self._stats = stats

    def stats(self):
        return self._stats


def _setup_log(tmp_path, monkeypatch, capsys, stats: dict) -> str:
    from bench import llmbatch_runner

    monkeypatch.setattr(llmbatch_runner, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(llmbatch_runner, "build_engine", lambda *a, **k: (_Engine(stats), 0.0))
    monkeypatch.setattr(llmbatch_runner, "warm_up", lambda *a: 0.0)
    monkeypatch.setattr(llmbatch_runner, "weight_bytes", lambda e: 0)
    monkeypatch.setattr("bench.llmbatch_rows._cuda_allocated", lambda: 0)
    bench_run.run_llmbatch(bench_run.parse_args([]), bench_run.Recorder(str(tmp_path),
                           {"runs": {}}), {}, "unused", "bfloat16", "cuda", 100)
    return capsys.readouterr().err


def test_the_setup_log_says_which_gemv_steps_left_the_kernels(tmp_path, monkeypatch, capsys):
    """A multi-row failure alone (51cf0de) keeps the gemv layers on at gemv_max_rows 1: the
    log must not call them off."""
    err = _setup_log(tmp_path, monkeypatch, capsys,
                     {"skinny_gemv_active": True, "skinny_gemv_error": "qkv (3 rows): x"})
    assert ("llmbatch: multi-row gemv OFF (gemv_max_rows back to 1, one-token steps keep "
            "the gemv layers), its start-up check failed: qkv (3 rows): x") in err
    assert "gemv layers OFF" not in err
    err = _setup_log(tmp_path, monkeypatch, capsys,
                     {"skinny_gemv_active": False, "skinny_gemv_error": "qkv: x"})
    assert "llmbatch: gemv layers OFF, their start-up check failed: qkv: x" in err
