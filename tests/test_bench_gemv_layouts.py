"""bench/bench_gemv_layouts.py: the CPU dry run end to end (every shape x variant timed and
equal to F.linear), a wrong variant reported as an error row and not timed, the per-token
summary arithmetic, the global switches restored, and the refusals."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench import bench_gemv_layouts as bgl
from bench import bench_skinny_matmul as bsm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SHAPE_TINY's five matmuls, (weight rows N, K): qkv 64 + 2 x 32, gate_up 2 x 128.
TINY_NK = {"qkv": (128, 64), "o_proj": (64, 64), "gate_up": (256, 64), "down": (64, 128),
           "lm_head": (1024, 64)}
VARIANT_NAMES = ["linear", "mm_wt", "mv", "linear_m2", "linear_m4", "linear_m8", "matmul_w_xt",
                 "linear_zero_bias", "linear_cublaslt", "linear_fp32_reduce",
                 # layers/gemv.py (Triton, the interpreter in the dry run): the table's pick;
                 # its 5 other tiles run on a GPU or when named (the interpreter is slow)
                 "gemv",
                 # M = 5 cells: torch at M = 5 (their reference), the multi-row gemv's pick
                 "linear_rows5", "gemv_rows5"]
ROWS = {"linear_rows5": 5, "gemv_rows5": 5}


def test_dry_run_times_every_shape_and_variant(tmp_path):
    out = tmp_path / "gemv.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_gemv_layouts", "--dry-run",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["dry_run"], data["shape"], data["dtype"]) == (True, "tiny", "torch.float32")
    assert data["variants"] == VARIANT_NAMES
    rows = data["rows"]
    assert [(r["case"], r["variant"]) for r in rows] == \
        [(c, v) for c in TINY_NK for v in VARIANT_NAMES]
    for r in rows:
        assert "error" not in r, r
        assert (r["n"], r["k"]) == TINY_NK[r["case"]]
        assert r["weight_bytes"] == 4 * r["n"] * r["k"]
        assert r["equal"] is True and r["max_abs_diff"] < 1e-4
        assert isinstance(r["us"], float) and r["us"] > 0
        assert r["gbs"] == pytest.approx(r["weight_bytes"] / r["us"] / 1e3, abs=0.06)
        assert r["rows"] == ROWS.get(r["variant"], 1)
        ref = "linear_rows5" if r["rows"] == 5 else "linear"      # ratios at the same M
        base = next(b for b in rows if (b["case"], b["variant"]) == (r["case"], ref))
        assert r["ratio"] == pytest.approx(r["us"] / base["us"], abs=1e-3)
        assert r["pad_m"] == {"linear_m2": 2, "linear_m4": 4, "linear_m8": 8}.get(r["variant"], 1)
    assert all(r["ratio"] == 1.0 for r in rows if r["variant"] in ("linear", "linear_rows5"))
    # The summary is the arithmetic of the rows: 2 layers of the four per-layer shapes + lm_head.
    s = data["summary"]
    lin = {r["case"]: r["us"] for r in rows if r["variant"] == "linear"}
    best = {c: min(r["us"] for r in rows if r["case"] == c and r["rows"] == 1)   # M = 1 only
            for c in TINY_NK}
    per_layer = ("qkv", "o_proj", "gate_up", "down")
    assert s["num_layers"] == 2
    assert s["token_linear_us"] == pytest.approx(
        2 * sum(lin[c] for c in per_layer) + lin["lm_head"], abs=2e-3)
    assert s["token_best_us"] == pytest.approx(
        2 * sum(best[c] for c in per_layer) + best["lm_head"], abs=2e-3)
    assert s["token_saving_us"] >= 0
    for c, name in s["best"].items():
        assert next(r["us"] for r in rows if (r["case"], r["variant"]) == (c, name)) == best[c]
    # Printed last: the table (one line per variant) and the per-token line.
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("per layer (qkv+o_proj+gate_up+down): linear ")
    assert "a token would save" in lines[-1]
    assert sum(line.split(" | ")[0].strip() in VARIANT_NAMES for line in lines) == 13
    assert "ERROR" not in proc.stdout


def test_wrong_or_failing_variant_is_an_error_row_not_timed():
    case = bsm.Case("o_proj", n=32, k=16, kind="residual")
    variants = [bgl.VARIANTS[0],
                bgl.Variant("doubled", lambda x, w: 2 * F.linear(x, w)),
                bgl.Variant("raises", lambda x, w: torch.mm(w, x)),   # (32, 16) @ (1, 16)
                bgl.Variant("mv", lambda x, w: torch.mv(w, x[0])[None])]
    args = argparse.Namespace(iters=1, reps=1)
    rows = bgl.run_shape(case, variants, torch.float32, torch.device("cpu"), args, 1.0)
    assert [r["variant"] for r in rows] == ["linear", "doubled", "raises", "mv"]
    wrong, raises = rows[1], rows[2]
    assert wrong["equal"] is False and wrong["error"].startswith(
        "ValueError: result differs from linear: max abs diff")
    assert raises["error"].startswith("RuntimeError: ") and "equal" not in raises
    for r in (wrong, raises):
        assert not {"us", "gbs", "ratio"} & set(r)
    assert rows[3]["equal"] is True and rows[3]["us"] > 0 and rows[0]["ratio"] == 1.0
    # Without the faulty shapes' rows the per-token summary says it is incomplete.
    assert bgl.summary(rows, 2) is None


def test_summary_of_hand_made_rows():
    def row(case, variant, us):
        return {"case": case, "variant": variant, "us": us}

    rows = []
    for case, lin, other in (("qkv", 6.0, 4.0), ("o_proj", 6.0, 7.0), ("gate_up", 18.0, 15.0),
                             ("down", 13.0, 10.0), ("lm_head", 120.0, 100.0)):
        rows += [row(case, "linear", lin), row(case, "mm_wt", other)]
    rows.append({"case": "down", "variant": "mv", "error": "ValueError: x"})   # not timed
    s = bgl.summary(rows, 16)
    assert s == {"num_layers": 16, "layer_linear_us": 43.0, "layer_best_us": 35.0,
                 "token_linear_us": 16 * 43.0 + 120.0, "token_best_us": 16 * 35.0 + 100.0,
                 "token_saving_us": 148.0,
                 "best": {"qkv": "mm_wt", "o_proj": "linear", "gate_up": "mm_wt",
                          "down": "mm_wt", "lm_head": "mm_wt"}}


def test_global_switches_are_restored():
    flags = torch.backends.cuda.matmul
    before = flags.allow_bf16_reduced_precision_reduction
    with bgl.torch_setting("no_reduced_reduction", cuda=False):
        assert flags.allow_bf16_reduced_precision_reduction is False
    assert flags.allow_bf16_reduced_precision_reduction is before
    backend = torch.backends.cuda.preferred_blas_library()
    with bgl.torch_setting("cublaslt", cuda=False):   # a no-op without CUDA
        assert torch.backends.cuda.preferred_blas_library() == backend
    assert torch.backends.cuda.preferred_blas_library() == backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(capsys):
    assert bgl.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a CUDA device" in err


def test_rejects_unknown_variant(capsys):
    assert bgl.main(["--dry-run", "--variants", "linear,gemm"]) == 2
    assert "unknown variant 'gemm'" in capsys.readouterr().err


def test_variant_subset_keeps_linear_first(tmp_path):
    out = tmp_path / "g.json"
    assert bgl.main(["--dry-run", "--variants", "mv", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["variants"] == ["linear", "mv"]
    assert [r["variant"] for r in data["rows"]] == ["linear", "mv"] * 5
    # A gemv tile the dry run leaves out by default runs when named.
    assert bgl.main(["--dry-run", "--variants", "gemv_n32k256w8s2p3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["linear", "gemv_n32k256w8s2p3"] * 5
    assert all(r["equal"] and "error" not in r for r in rows)
