"""bench/run.py --pdl: the llmbatch-skinny-pdl A/B rows (EngineConfig.skinny_matmul + pdl), off
by default, skipped with a reason on CPU, and built with both engine overrides on CUDA."""

from __future__ import annotations

from bench import run as bench_run

WORKLOADS = ("W-RANDOM", "W-PREFIX", "W-BATCH1")


def test_pdl_rows_are_opt_in_and_skipped_on_cpu(tmp_path):
    assert bench_run.parse_args([]).pdl is False
    args = bench_run.parse_args(["--pdl"])
    assert args.pdl is True
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, {w: object() for w in WORKLOADS}, "unused", "float32",
                           "cpu", 100, variant="skinny-pdl")
    skipped = {"llmbatch-skinny-pdl": {"skipped": "skinny matmul with PDL runs on CUDA only"}}
    assert rec.results["runs"] == {w: skipped for w in WORKLOADS}


def test_pdl_variant_turns_on_skinny_matmul_and_pdl(tmp_path, monkeypatch):
    """On a CUDA device string the variant asks build_engine for both flags (the engine build
    is stubbed to fail, which the variant's rows record as an error)."""
    seen = {}

    def fake_build(model_dir, dtype, device, **overrides):
        seen.update(overrides)
        raise RuntimeError("stub engine")

    monkeypatch.setattr(bench_run.llmbatch_runner, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(bench_run.llmbatch_runner, "build_engine", fake_build)
    args = bench_run.parse_args(["--pdl"])
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(args, rec, {w: object() for w in WORKLOADS}, "unused", "bfloat16",
                           "cuda", 100, variant="skinny-pdl")
    assert seen["skinny_matmul"] is True and seen["pdl"] is True
    assert rec.results["runs"]["W-BATCH1"] == {
        "llmbatch-skinny-pdl": {"error": "RuntimeError: stub engine"}}
