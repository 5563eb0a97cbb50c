"""bench/ end to end on the CPU: the dry run of bench/gpu_check.sh, the Triton kernels compiled
for Hopper without a GPU (bench/compile_kernels.py), the quantized rows of bench.run and the
batch-1 option sweep (bench/bench_batch1.py).
Skipped while the engine cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import report
from bench.llmbatch_runner import engine_unavailable_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- the one-call GPU script, dry run on the CPU -------------------------------------------
@pytest.mark.timeout(300)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    reason = engine_unavailable_reason()
    if reason is not None:
        pytest.skip(f"llmbatch.runtime.engine does not import yet ({reason})")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, BENCH_MODEL_DIR=str(tmp_path / "model"),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=290)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines.count(" | ".join(report.HEADER)) == 1
    table = lines[lines.index(" | ".join(report.HEADER)):]
    assert table[-1].startswith("W-SPEC")                # the table is printed last
    systems = {(r.split(" | ")[0], r.split(" | ")[1]) for r in table[2:]}
    for pair in [("W-RANDOM", "llmbatch"), ("W-RANDOM", "hf-static"), ("W-RANDOM", "hf-cb"),
                 ("W-PREFIX", "llmbatch"), ("W-PREFIX", "hf-cb"), ("W-BATCH1", "llmbatch"),
                 ("W-BATCH1", "hf-generate")]:
        assert pair in systems
    results = json.loads((out / "results.json").read_text())
    assert results["smoke_test_only"] is True
    for name in ("W-RANDOM", "W-PREFIX", "W-BATCH1"):
        run = results["runs"][name]["llmbatch"]
        assert run["output_tokens"] == results["workloads"][name]["num_output_tokens"]
        assert run["num_errors"] == 0 and run["num_wrong_lengths"] == 0
        # One run a workload in the dry run (--repeats defaults to 1 off CUDA), kept as such.
        assert run["repeats"]["n"] == 1 and run["repeats"]["num_failed"] == 0
        assert run["repeats"]["out_tok_per_s"] == [run["out_tok_per_s"]]
    assert results["llmbatch_repeats"] == 1
    # W-PREFIX scaled: 8 groups share a 51-token prefix (3 full blocks of 16) -> hits > 0
    assert results["runs"]["W-PREFIX"]["llmbatch"]["num_cached_prompt_tokens"] > 0
    # The profiled slice ran and wrote its kernel table; step phases are timed.
    assert "error" not in results["llmbatch_profile"], results["llmbatch_profile"]
    profile_text = (out / "profile_llmbatch.txt").read_text()
    assert profile_text.count("== sorted by") == 2   # device time once, then host time
    assert "== sorted by self_cpu_time_total" in profile_text
    delta = results["runs"]["W-RANDOM"]["llmbatch"]["engine_stats_delta"]
    assert delta["execute_s"] > 0 and delta["schedule_s"] > 0
    # The M=1 GEMM layouts step ran first (dry run on the CPU): every shape x variant timed and
    # equal to F.linear, its table and per-token line on the console before pytest's output.
    gemv = json.loads((out / "bench_gemv_layouts.json").read_text())
    # 10 torch dispatches + the gemv tile table's pick (its other tiles run on a GPU only),
    # then the M = 5 pair (torch at 5 rows, the multi-row gemv)
    assert gemv["dry_run"] is True and len(gemv["rows"]) == 5 * len(gemv["variants"]) == 65
    assert gemv["variants"][-2:] == ["linear_rows5", "gemv_rows5"]
    assert all(r["equal"] is True and r["us"] > 0 for r in gemv["rows"])
    assert gemv["summary"]["num_layers"] == 2
    assert "a token would save" in (out / "bench_gemv_layouts.log").read_text()
    gemv_at = proc.stdout.index("=== M=1 GEMM layouts (bench_gemv_layouts)")
    assert gemv_at < proc.stdout.index("a token would save") < proc.stdout.index("=== pytest")


@pytest.mark.timeout(300)
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """The real Triton compiler (not the interpreter the CPU tests use) accepts a sample of the
    launched specialisations, down to a cubin from ptxas; bench/compile_kernels.py has all."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    sample = ("paged_attention bf16 hd64 g8 bq2 bm16 bs16 splits8,"
              "paged_attention fp32 hd128 g1 bq64 bm64 bs32 splits1,"
              "reduce_splits bf16 splits16,store_kv bf16 slots i32,rms_norm bf16 residual=True,"
              "silu_and_mul bf16,rotary bf16 q32 k8")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--filter", sample],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    if proc.returncode != 0 and "backend" in proc.stderr.lower() and "nvidia" in proc.stderr:
        pytest.skip(f"triton has no NVIDIA backend here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    import re

    done = re.search(r"(\d+)/(\d+) variants compiled for sm_90", proc.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 7, proc.stdout


def _cpu_bench(tmp_path, *flags) -> dict:
    """bench.run on the tiny shape, CPU, 5 % workloads, no peers, plus `flags`: results.json."""
    reason = engine_unavailable_reason()
    if reason is not None:
        pytest.skip(f"llmbatch.runtime.engine does not import yet ({reason})")
    import json

    from bench.run import main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--device", "cpu", "--scale", "0.05", "--skip-peers",
               *flags, "--out", str(out), "--model-dir", str(tmp_path / "model")])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_quantized_runs_on_cpu_report_weights_beside_bf16(tmp_path):
    """--quantization bf16,nf4,int8: W-RANDOM and W-BATCH1 once per method (W-PREFIX only
    unquantized), each with the loaded weight bytes; the quantized ones are smaller."""
    pytest.importorskip("bitsandbytes")
    results = _cpu_bench(tmp_path, "--workloads", "W-RANDOM,W-PREFIX,W-BATCH1",
                         "--quantization", "bf16,nf4,int8")
    assert sorted(results["runs"]["W-PREFIX"]) == ["llmbatch"]
    for name in ("W-RANDOM", "W-BATCH1"):
        runs = results["runs"][name]
        assert list(runs) == ["llmbatch", "llmbatch-nf4", "llmbatch-int8"]
        expected = results["workloads"][name]["num_output_tokens"]
        for system, quant in (("llmbatch", "none"), ("llmbatch-nf4", "nf4"),
                              ("llmbatch-int8", "int8")):
            run = runs[system]
            assert (run["quantization"], run["output_tokens"], run["num_errors"]) == \
                (quant, expected, 0)
            assert run["weight_bytes"] == sum(run["weight_bytes_per_rank"]) > 0
        assert runs["llmbatch-nf4"]["weight_bytes"] < runs["llmbatch-int8"]["weight_bytes"] \
            < runs["llmbatch"]["weight_bytes"]
    rows = [r for r in results["table"] if r["workload"] == "W-RANDOM"]
    assert [r["system"] for r in rows] == ["llmbatch", "llmbatch-nf4", "llmbatch-int8"]
    agree = results["runs"]["W-RANDOM"]["llmbatch-nf4"]["agreement_with_llmbatch"]
    assert 0.0 <= agree <= 1.0
    shown = agree if agree >= 1 else min(agree, 0.99)   # "100%" only when identical
    assert set(rows[1]["ratios"]) == {f"llmbatch ({shown:.0%} same tokens)"}


@pytest.mark.timeout(300)
def test_async_scheduling_row_on_cpu(tmp_path):
    """--async-scheduling: the A/B row llmbatch-async beside llmbatch, same token counts."""
    results = _cpu_bench(tmp_path, "--workloads", "W-RANDOM,W-BATCH1", "--async-scheduling")
    assert results["llmbatch-async_setup"]["stats"]["async_scheduling"] is True
    assert results["llmbatch_setup"]["stats"]["async_scheduling"] is False
    for name in ("W-RANDOM", "W-BATCH1"):
        runs = results["runs"][name]
        assert list(runs) == ["llmbatch", "llmbatch-async"]
        expected = results["workloads"][name]["num_output_tokens"]
        assert runs["llmbatch-async"]["output_tokens"] == expected
        assert runs["llmbatch-async"]["num_errors"] == 0
        # float32 on the CPU: async scheduling reproduces every greedy token.
        assert runs["llmbatch-async"]["agreement_with_llmbatch"] == 1.0
    rows = [r for r in results["table"] if r["workload"] == "W-RANDOM"]
    assert [r["system"] for r in rows] == ["llmbatch", "llmbatch-async"]
    assert set(rows[1]["ratios"]) == {"llmbatch (100% same tokens)"}


@pytest.mark.timeout(300)
def test_batch1_sweep_dry_run_on_cpu(tmp_path):
    """bench/bench_batch1.py end to end on the tiny shape (kernels under the Triton
    interpreter): every option runs, in order, and none changes a token (float32 here)."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_batch1", "--dry-run", "--all",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench_batch1.json").read_text())
    rows = out["rows"]
    singles = [
        "defaults", "graph logits flipped", "skinny gemv flipped",
        "gemv weights before the PDL wait",
        "gemv tiles of stop 17", "gemv weights into L2 before the PDL wait", "PDL flipped",
        "rotary in attention flipped", "L2 prefetch o_proj", "L2 prefetch o_proj+next_qkv",
        "split reduce fused",
        "argmax in torch", "rope table off", "L2 prefetch o_proj+next_qkv+gate_up 8 MiB",
        "L2 prefetch o_proj+next_qkv+gate_up 16 MiB", "attention splits 8",
        "attention splits 32", "attention key tile 32", "attention key tile 128",
        "sync scheduling"]
    # CPU timings decide whether any option "won": the combined row is there or announced
    # as none, then the closing defaults row.
    combined = [r["option"] for r in rows[len(singles):-1]]
    assert [r["option"] for r in rows] == singles + combined + ["defaults"]
    assert combined in ([], ["winners combined"])
    assert ("batch1 winners combined" + " " * 24 + " none:" in proc.stdout) == (not combined)
    # The tiny shape's 2 layers: o_proj each, + qkv each, + a gate_up prefix each.
    assert [rows[i]["detail"] for i in (8, 9, 13, 14)] == [
        f"{n} weights touched" for n in (2, 4, 6, 6)]
    assert all(r["same_tokens_as_first"] and r["num_errors"] == 0 for r in rows)
    assert out["smoke_test_only"] is True
    assert proc.stdout.count("batch1 ") == 22
    # On the CPU the engine has neither gemv layers nor PDL (CUDA only): the flips would turn
    # them on, which the CPU rows refuse; the weight prefetch and the tile table have no gemv
    # launch to change.
    assert [rows[i]["detail"] for i in (1, 2, 3, 4, 5, 6, 7)] == [
        "needs CUDA graphs: no effect", "needs CUDA: not applied",
        "the gemv layers are off: no effect",
        "stop 17's table: 16x512 w4 p3 on every shape; the gemv layers are off: no effect",
        "the gemv layers are off: no effect", "needs sm_90 CUDA: not applied",
        "needs the triton backend and the fused rotary (CUDA): not applied"]


def test_batch1_sweep_default_rows_are_the_open_options():
    """Without --all the sweep runs only what is still undecided, between two defaults rows;
    --all appends the options measured slower before the closing defaults row."""
    from bench.bench_batch1 import options

    short = [label for label, _, _ in options()]
    assert short == ["defaults", "graph logits flipped", "skinny gemv flipped",
                     "gemv weights before the PDL wait", "gemv tiles of stop 17",
                     "gemv weights into L2 before the PDL wait", "PDL flipped",
                     "rotary in attention flipped", "defaults"]
    every = [label for label, _, _ in options(all_rows=True)]
    assert every[:8] == short[:8] and every[-1] == "defaults" and len(every) == 21


def _row(option, tpot, **extra):
    return {"option": option, "tpot_s": tpot, "num_errors": 0, "num_wrong_lengths": 0, **extra}


def test_batch1_winners_take_the_fastest_of_each_exclusive_group():
    from bench.bench_batch1 import combine_winners

    calls = []

    def opt(label):
        return (label, lambda engine, device: calls.append(("apply", label)) or
                ("7 weights" if label.startswith("L2") else ""),
                lambda engine: calls.append(("undo", label)))

    labels = ["defaults", "L2 prefetch a", "L2 prefetch b", "attention splits 8",
              "attention splits 32", "attention key tile 32", "argmax in torch", "broken",
              "rope table off", "sync scheduling"]
    opts = [opt(label) for label in labels]
    rows = [_row("defaults", 1.000), _row("L2 prefetch a", 0.950), _row("L2 prefetch b", 0.940),
            _row("attention splits 8", 0.985), _row("attention splits 32", 0.970),
            _row("attention key tile 32", 0.995),         # within the 1 % margin: not a win
            _row("argmax in torch", 0.900, num_errors=1),  # fast but lost a row: not a win
            {"option": "broken", "error": "RuntimeError: x"},
            _row("rope table off", 1.020), _row("sync scheduling", 0.980)]
    label, apply, undo = combine_winners(rows, opts)
    assert label == "winners combined"
    assert apply(None, None) == ("L2 prefetch b (7 weights) + attention splits 32 + "
                                 "sync scheduling")
    undo(None)
    assert calls == [("apply", "L2 prefetch b"), ("apply", "attention splits 32"),
                     ("apply", "sync scheduling"), ("undo", "sync scheduling"),
                     ("undo", "attention splits 32"), ("undo", "L2 prefetch b")]
    # No winner, or no defaults figure to compare with: no combined row.
    assert combine_winners(rows[:1] + [_row("rope table off", 1.0)], opts) is None
    assert combine_winners([{"option": "defaults", "error": "x"}] + rows[1:], opts) is None


def test_batch1_sweep_runs_the_combined_winners_before_the_closing_defaults(tmp_path,
                                                                           monkeypatch):
    from bench import bench_batch1

    applied = []
    nothing = (bench_batch1.DEFAULTS, lambda engine, device: "", lambda engine: None)
    fast = ("fast", lambda engine, device: applied.append("fast") or "", lambda engine: None)
    tpots = iter([1.0, 0.5, 0.5, 1.0])

    def fake_row(engine, workload, label, apply, undo, device):
        apply(engine, device)
        undo(engine)
        return _row(label, next(tpots), detail="", capture_s=0.0, cuda_graph_error=None,
                    _outputs={"r": [1]})

    monkeypatch.setattr(bench_batch1, "options", lambda: [nothing, fast, nothing])
    monkeypatch.setattr(bench_batch1, "run_row", fake_row)
    assert bench_batch1.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_batch1.json").read_text())["rows"]
    assert [r["option"] for r in rows] == ["defaults", "fast", "winners combined", "defaults"]
    assert applied == ["fast", "fast"]


def test_batch1_sweep_records_a_broken_option_and_goes_on(tmp_path, monkeypatch):
    """An option that raises leaves an error row (JSON and console) and exit status 1; the
    rows after it still run."""
    from bench import bench_batch1

    def broken(engine, device):
        raise RuntimeError("option broke")

    nothing = (bench_batch1.DEFAULTS, lambda engine, device: "", lambda engine: None)
    monkeypatch.setattr(bench_batch1, "options",
                        lambda: [nothing, ("broken", broken, lambda engine: None), nothing])
    assert bench_batch1.main(["--dry-run", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench_batch1.json").read_text())["rows"]
    assert [r["option"] for r in rows] == ["defaults", "broken", "defaults"]
    assert rows[1] == {"option": "broken", "error": "RuntimeError: option broke"}
    assert rows[2]["same_tokens_as_first"] is True and rows[2]["num_errors"] == 0
