"""bench/bench_skinny_matmul.py: the CPU dry run (tiny shapes, Triton interpreter) end to end, so
the micro-benchmark the next GPU session runs never rots; and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import bench_skinny_matmul as bsm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_row(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "skinny.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_skinny_matmul", "--dry-run",
                           "--m", "1,3", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] is True
    rows = data["rows"]
    # 5 cases x 2 M x (baseline, cublas, default tiles, the FMA sweep tiles), plus one split-K
    # config for qkv, o_proj and down (2 M each)
    assert len(rows) == 5 * 2 * 4 + 3 * 2
    assert sum(r["system"] == "cublas" for r in rows) == 10
    assert not [r for r in rows if "error" in r]
    skinny = [r for r in rows if r["system"] == "skinny"]
    assert len(skinny) == 26 and all(r["max_abs_diff"] < 1e-4 for r in skinny)
    split = [r for r in skinny if r["config"]["split_k"] > 1]
    assert sorted(r["case"] for r in split) == ["down", "down", "o_proj", "o_proj", "qkv", "qkv"]
    assert {r["case"] for r in rows} == {"qkv", "o_proj", "gate_up", "down", "lm_head"}
    assert {r["config"]["dot"] for r in skinny} == {True, False}
    assert sum(r.get("best", False) for r in skinny) == 10  # one per (case, M)
    # The table: one line per (case, M) and a per-step estimate per M.
    assert "case    |  M | baseline us" in proc.stdout
    assert proc.stdout.count("qkv     |") == 2
    assert proc.stdout.count("x16 layers") == 2


def test_split_k_sweep_only_for_the_few_program_cases():
    pytest.importorskip("triton")
    from llmbatch.runtime.layers import skinny_matmul as sm

    for name, splits in (("qkv", [2, 4]), ("o_proj", [2, 4]), ("down", [2, 4, 8]),
                         ("gate_up", []), ("lm_head", [])):
        assert [c.split_k for c in bsm.split_k_configs(sm, name)] == splits
        assert [c.split_k for c in bsm.sweep_configs(sm, name)] == [1] * 4 + splits


def test_bytes_moved_counts_weight_and_activations():
    case = bsm.Case("gate_up", n=8, k=4, kind="norm_gate_up")
    # weight 16 x 4, x 2 x 4, out 2 x 8, norm weight 4; 2 bytes each
    assert case.bytes_moved(2, 2) == 2 * (64 + 8 + 16 + 4)
    res = bsm.Case("down", n=8, k=4, kind="residual")
    assert res.bytes_moved(2, 2) == 2 * (32 + 8 + 16 + 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(capsys):
    assert bsm.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a CUDA device" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_pdl_refused_without_cuda(capsys):
    assert bsm.main(["--dry-run", "--pdl"]) == 2
    assert "--pdl needs a CUDA device" in capsys.readouterr().err


def test_rejects_bad_token_counts(capsys):
    assert bsm.main(["--dry-run", "--m", "1,17"]) == 2
    assert "--m values must be in 1..16" in capsys.readouterr().err
