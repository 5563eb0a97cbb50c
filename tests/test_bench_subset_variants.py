"""bench.run's variants that run a subset of the workloads (bench/variants.py), each off by
default, skipped with a reason on the CPU, and built with its engine overrides on CUDA:
--gemv-rows8 (EngineConfig.gemv_max_rows 8: W-SPEC and W-BATCH1), --prefill-graphs
(EngineConfig.prefill_graph_max_tokens 512: W-BATCH1 and W-SPEC) and --no-graph-logits
(EngineConfig.graph_logits off: W-BATCH1 and W-SPEC). Also the setup log's line
for the multi-row gemv's start-up check."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run as bench_run
from tests.test_bench_run_cuda_variants import WORKLOADS, stub_build_engine

# variant -> (argparse dest, CPU skip reason, EngineConfig overrides, gpu_check.sh env switch)
SUBSET_VARIANTS = {
    "gemv-rows8": ("gemv_rows8", "the gemv layers run on CUDA only", {"gemv_max_rows": 8},
                   "BENCH_GEMV_ROWS8_ROWS"),
    "prefill-graphs": ("prefill_graphs", "CUDA graphs run on CUDA only",
                       {"prefill_graph_max_tokens": 512}, "BENCH_PREFILL_GRAPH_ROWS"),
    "no-graph-logits": ("no_graph_logits", "CUDA graphs run on CUDA only",
                        {"graph_logits": False}, "BENCH_NO_GRAPH_LOGITS_ROWS"),
}


def _rows(tmp_path, device: str, variant: str) -> dict:
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(bench_run.parse_args([f"--{variant}"]), rec,
                           {w: object() for w in (*WORKLOADS, "W-SPEC")}, "unused",
                           "float32" if device == "cpu" else "bfloat16", device, 100,
                           variant=variant)
    return rec.results["runs"]


@pytest.mark.parametrize("variant", SUBSET_VARIANTS)
def test_variant_runs_w_spec_and_w_batch1_only_with_its_overrides(tmp_path, monkeypatch,
                                                                   variant):
    dest, reason, overrides, _ = SUBSET_VARIANTS[variant]
    system = f"llmbatch-{variant}"
    assert getattr(bench_run.parse_args([]), dest) is False
    skipped = {system: {"skipped": reason}}
    assert _rows(tmp_path, "cpu", variant) == {"W-BATCH1": skipped, "W-SPEC": skipped}
    seen = stub_build_engine(monkeypatch)
    failed = {system: {"error": "RuntimeError: stub engine"}}
    assert _rows(tmp_path, "cuda", variant) == {"W-BATCH1": failed, "W-SPEC": failed}
    assert seen == {**overrides, "quantization": "none", "gpu_memory_utilization": 0.5}


@pytest.mark.parametrize("variant", SUBSET_VARIANTS)
def test_gpu_check_passes_the_flag_only_when_asked(variant):
    env = SUBSET_VARIANTS[variant][3]
    text = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    assert f'[ "${{{env}:-0}}" = 1 ] && MODE_ARGS+=(--{variant})' in text


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
