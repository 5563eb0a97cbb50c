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
