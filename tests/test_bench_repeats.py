"""bench.run --repeats: each llmbatch workload (W-RANDOM, W-PREFIX, W-BATCH1) run N times on one
engine, the median run reported, every repetition's figures and their spread kept in the JSON and
shown in the table. Why: stop 20's H200 rows moved 4-10 % with the order of the engines and
between calls, more than the A/B differences they were read for."""

from __future__ import annotations

import pytest

from bench import llmbatch_runner, report
from bench import run as bench_run


def _run(speed, tpot=None, outputs=None, errors=0):
    return {"out_tok_per_s": speed, "tpot_s": tpot, "num_errors": errors,
            "num_wrong_lengths": 0, "_outputs": outputs or {"r0": [1, 2, 3]}}


# -- the median run ----------------------------------------------------------------------
def test_median_run_is_reported_whole_with_every_repetition_kept():
    runs = [_run(39_000.0, 0.0040), _run(36_000.0, 0.0043), _run(38_000.0, 0.0041)]
    out = llmbatch_runner.summarize_repeats(runs)
    # The median by out tok/s is the third run: its own TPOT, not another run's.
    assert (out["out_tok_per_s"], out["tpot_s"]) == (38_000.0, 0.0041)
    rep = out["repeats"]
    assert rep["n"] == 3 and rep["median_index"] == 2
    assert rep["out_tok_per_s"] == [39_000.0, 36_000.0, 38_000.0]   # in run order
    assert rep["tpot_s"] == [0.0040, 0.0043, 0.0041]
    assert (rep["min_out_tok_per_s"], rep["max_out_tok_per_s"]) == (36_000.0, 39_000.0)
    assert rep["spread"] == pytest.approx(3_000.0 / 38_000.0)
    assert rep["num_differing_tokens"] == 0 and rep["num_failed"] == 0
    assert out["_outputs"] == runs[2]["_outputs"]


def test_even_count_reports_the_slower_middle_run():
    out = llmbatch_runner.summarize_repeats([_run(10.0), _run(40.0), _run(20.0), _run(30.0)])
    assert out["out_tok_per_s"] == 20.0 and out["repeats"]["median_index"] == 2


def test_batch1_median_is_by_tpot_its_figure():
    """W-BATCH1's tok/s includes its TTFT: the run with the median tok/s need not have the
    median TPOT. By TPOT, the slower middle of an even count is the higher TPOT."""
    runs = [_run(1000.0, 0.00095), _run(990.0, 0.00090), _run(1010.0, 0.00092)]
    assert llmbatch_runner.summarize_repeats(runs)["tpot_s"] == 0.00095        # by tok/s
    out = llmbatch_runner.summarize_repeats(runs, by="tpot_s")
    assert (out["tpot_s"], out["repeats"]["median_index"]) == (0.00092, 2)
    runs = [_run(1.0, 0.3), _run(1.0, 0.1), _run(1.0, 0.4), _run(1.0, 0.2), _run(1.0, None)]
    assert llmbatch_runner.summarize_repeats(runs, by="tpot_s")["tpot_s"] == 0.3
    assert llmbatch_runner.summarize_repeats(runs[:4], by="tpot_s")["tpot_s"] == 0.3
    no_tpot = [_run(3.0), _run(1.0), _run(2.0)]   # then by tok/s
    assert llmbatch_runner.summarize_repeats(no_tpot, by="tpot_s")["out_tok_per_s"] == 2.0
    with pytest.raises(ValueError, match="by must be"):
        llmbatch_runner.summarize_repeats(runs, by="ttft_s")


def test_one_run_is_itself_with_no_spread():
    out = llmbatch_runner.summarize_repeats([_run(5.0, 0.2)])
    assert out["out_tok_per_s"] == 5.0
    assert out["repeats"] == {"n": 1, "median_index": 0, "out_tok_per_s": [5.0],
                              "tpot_s": [0.2], "min_out_tok_per_s": 5.0,
                              "max_out_tok_per_s": 5.0, "spread": 0.0,
                              "num_differing_tokens": 0, "num_failed": 0}


def test_differing_tokens_and_failed_repetitions_are_counted_not_raised():
    runs = [_run(3.0, outputs={"r0": [1, 2]}), _run(2.0, outputs={"r0": [1, 2]}, errors=1),
            _run(1.0, outputs={"r0": [1, 9]})]
    rep = llmbatch_runner.summarize_repeats(runs)["repeats"]
    assert rep["num_differing_tokens"] == 1   # the median run's tokens are the reference
    assert rep["num_failed"] == 1
    assert "tpot_s" not in rep                 # no run had a TPOT


def test_runs_without_a_speed_sort_first_and_leave_no_spread():
    out = llmbatch_runner.summarize_repeats([{}, {}, {}])
    assert out["repeats"]["out_tok_per_s"] == [None, None, None]
    assert out["repeats"]["spread"] is None


def test_summarize_rejects_no_runs():
    with pytest.raises(ValueError, match="at least one run"):
        llmbatch_runner.summarize_repeats([])


# -- the table ---------------------------------------------------------------------------
def _table(runs: dict, workload: str = "W-RANDOM") -> list[str]:
    results = {"workloads": {workload: {"floor": {"out_tok_per_s": 100_000.0, "tpot_s": 5e-4}}},
               "runs": {workload: runs}}
    return report.format_table(report.table_rows(results)).splitlines()[2:]


def test_cell_shows_the_largest_deviation_from_the_median_and_the_count():
    med = {"out_tok_per_s": 38_000.0, "prefix_hit_rate": 0.0,
           "repeats": {"n": 3, "out_tok_per_s": [39_000.0, 36_000.0, 38_000.0]}}
    # 36,000 is 5.3 % under the reported 38,000, the largest distance from it.
    assert _table({"llmbatch": med})[0] == \
        "W-RANDOM | llmbatch | 38,000 (±5.3%, 3 runs) | — | 0.380 | 0.0% | —"


def test_batch1_cell_gives_the_tpot_spread():
    med = {"out_tok_per_s": 1000.0, "tpot_s": 0.001,
           "repeats": {"n": 3, "out_tok_per_s": [1000.0, 990.0, 1010.0],
                       "tpot_s": [0.001, 0.00102, 0.00099]}}
    assert _table({"llmbatch": med}, "W-BATCH1")[0] == \
        "W-BATCH1 | llmbatch | 1,000.0 (TPOT 1.00 ms, ±2.0%, 3 runs) | — | 0.500 | — | —"


def test_batch1_cell_gives_the_ttft_where_the_run_has_it():
    # Prefill CUDA graphs (engine.prefill_graph_max_tokens) show in TTFT, not in TPOT.
    run = {"out_tok_per_s": 1000.0, "tpot_s": 0.001, "ttft_s_mean": 0.0102}
    assert _table({"llmbatch": run}, "W-BATCH1")[0] == \
        "W-BATCH1 | llmbatch | 1,000.0 (TPOT 1.00 ms, TTFT 10.2 ms) | — | 0.500 | — | —"


def test_single_run_cell_is_unchanged():
    one = {"out_tok_per_s": 38_000.0, "repeats": {"n": 1, "out_tok_per_s": [38_000.0]}}
    assert _table({"llmbatch": one})[0] == "W-RANDOM | llmbatch | 38,000 | — | 0.380 | — | —"


# -- the option --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1"])
def test_repeats_below_one_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--repeats", value])
    assert exc.value.code != 0
    assert f"--repeats must be >= 1, got {value}" in capsys.readouterr().err


def test_repeats_default_is_three_on_cuda_one_on_cpu():
    assert bench_run.parse_args(["--repeats", "5"]).repeats == 5
    args = bench_run.parse_args([])
    assert bench_run.num_repeats(args, "cuda") == bench_run.num_repeats(args, "cuda:1") == 3
    assert bench_run.num_repeats(args, "cpu") == 1
    assert bench_run.num_repeats(bench_run.parse_args(["--repeats", "2"]), "cpu") == 2


class _FakeEngine:
    def __init__(self, calls: list):
        self.calls = calls

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def stats(self):
        return {}


def test_each_workload_runs_n_times_on_one_engine_with_a_clean_cache(tmp_path, monkeypatch):
    calls: list = []
    speeds = iter([30.0, 10.0, 20.0] * 3)

    def fake_run(engine, w):
        calls.append(w)
        return {"out_tok_per_s": next(speeds), "_outputs": {"r": [1]}}

    monkeypatch.setattr(llmbatch_runner, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(llmbatch_runner, "build_engine",
                        lambda *a, **k: (_FakeEngine(calls), 0.0))
    monkeypatch.setattr(llmbatch_runner, "warm_up", lambda *a: 0.0)
    monkeypatch.setattr(llmbatch_runner, "weight_bytes", lambda e: 0)
    monkeypatch.setattr(llmbatch_runner, "run_workload", fake_run)
    monkeypatch.setattr("bench.llmbatch_rows._cuda_allocated", lambda: 0)
    rec = bench_run.Recorder(str(tmp_path), {"runs": {}})
    bench_run.run_llmbatch(bench_run.parse_args(["--repeats", "3"]), rec,
                           {"W-RANDOM": "R", "W-BATCH1": "B"}, "unused", "bfloat16", "cuda", 100)
    # A reset before every repetition: a repeated W-PREFIX must not hit the previous run's KV.
    assert calls == ["reset", "R"] * 3 + ["reset", "B"] * 3
    for name in ("W-RANDOM", "W-BATCH1"):
        run = rec.results["runs"][name]["llmbatch"]
        assert run["out_tok_per_s"] == 20.0 and run["repeats"]["n"] == 3
        assert "_outputs" not in run


def test_a_failed_repetition_fails_the_bench():
    results = {"runs": {"W-RANDOM": {
        "llmbatch": {"out_tok_per_s": 1.0, "num_errors": 0, "repeats": {"num_failed": 1}},
        "hf-cb": {"out_tok_per_s": 1.0}}}}
    assert bench_run.failed_runs(results) == ["W-RANDOM/llmbatch"]
