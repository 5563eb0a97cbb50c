"""Micro-benchmark: the same batch-1 product y[1, N] = x[1, K] @ W[N, K]^T reached through
different torch entry points and weight layouts, so cuBLAS picks different kernels at M = 1,
and through our one-row Triton GEMV (layers/gemv.py) at several tiles; plus M = 5 cells (a
batch-1 verify step of 4 draft tokens: gemv_linear's multi-row kernel against F.linear at
M = 5, the ratio against the latter) (GPU only; not a test;
W-BATCH1 tuning input: does another dispatch or our kernel stream the weight faster than
F.linear's "nvjet ... TNT" kernels, 1.4-2.1 TB/s on qkv / o_proj in stop 13?). The dry run
runs the gemv tile table's picks only (M = 1 and M = 5; the interpreter takes ~10 s a tile);
--variants names the others.

    python -m bench.bench_gemv_layouts [--out gemv.json] [--variants linear,mv] [--iters 64]
    python -m bench.bench_gemv_layouts --dry-run     # CPU smoke run: tiny shapes, float32

Shapes: the five matmuls of a decode step (bench_skinny_matmul.cases, built from
model_shapes.SHAPE_1B): qkv 3072x2048, o_proj 2048x2048, gate_up 16384x2048, down 2048x8192,
lm_head 128256x2048 (N x K), bf16. Variants (VARIANTS below), each checked against "linear"
within bf16 tolerance first; a variant whose result differs (or that raises) is an error row,
never timed. Timing is bench.gpu_timing.time_us: --iters calls captured in one CUDA graph
(launch overhead out, as in the engine's decode graph), cycling through weight copies so each
call reads its weight from DRAM, not L2; median of --reps replays. GB/s counts weight bytes
only; "ratio" is the variant's time over linear's (below 1: faster). Last: the summed per-layer
time of the best variant per shape against linear, x layers, plus the LM head: what a token
would save if each matmul took its best dispatch. JSON (--out) is rewritten after every shape.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench import bench_skinny_matmul as bsm
from bench import gpu_timing
from bench.model_shapes import SHAPE_1B, SHAPE_TINY, ModelShape

PER_LAYER = ("qkv", "o_proj", "gate_up", "down")   # summed, x num_hidden_layers
VERIFY_ROWS = 5   # the multi-row cells: k + 1 tokens of a batch-1 speculative verify step
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # rtol = atol


# Tiles of layers/gemv.py besides its table's pick: (block_n, block_k, num_warps, split_k,
# num_stages), named gemv_n{block_n}k{block_k}w{warps}s{split}p{stages}. Plain tuples: gemv
# (Triton) is imported at the first call, after main() chose the interpreter for the dry run.
# Since stop 18 they aim at what stop 17's run showed: without a split, the small shapes are
# latency-bound (o_proj streams 64 KB a program, one program an SM, at 1.7 TB/s; qkv's 192
# programs leave 60 SMs with two), and every split-K tile lost (they are gone from this list;
# stop 17's rows are in RESULTS.md). So: more, smaller programs (8 and 4 rows: 2-4 programs an
# SM on o_proj, qkv's 384 / 768 programs spread evenly), more bytes in flight a program (8
# warps, a 4th stage), and the 16 x 512 pick itself as the reference. The 32 x 256 split tile
# stays: tests name it (fewer, wider programs; slower in stop 17 everywhere).
_GEMV_TILES = [(16, 512, 4, 1, 3), (8, 512, 4, 1, 3), (8, 1024, 4, 1, 3), (4, 1024, 4, 1, 3),
               (16, 512, 8, 1, 3), (16, 512, 4, 1, 4), (32, 256, 8, 2, 3)]
GEMV_CONFIGS = {"gemv": None, **{"gemv_n{}k{}w{}s{}p{}".format(*t): t for t in _GEMV_TILES}}


def _gemv_prep(w: torch.Tensor) -> tuple:
    """The weight and its arrival counters (enough for any tile above: N / 8 tiles)."""
    return w, torch.zeros(w.shape[0] // 8 + 1, dtype=torch.int32, device=w.device)


def _gemv_call(x, w, counters, cfg):
    from llmbatch.runtime.layers import gemv

    return gemv.gemv_linear(x, w, counters=counters,
                            config=cfg and gemv.GemvConfig(*cfg))


@dataclass(frozen=True)
class Variant:
    name: str
    # call(x, *operands) -> (pad_m, N) or (1, N); only row 0 is the answer. Views such as .t()
    # or [None] launch nothing, so the timed graph holds the variant's matmul launches only.
    call: Callable
    # Per weight copy, built once before timing: the operands after x.
    prep: Callable = lambda w: (w,)
    pad_m: int = 1           # x padded with zero rows to this many (decode pads batches too)
    # x of this many random rows (> 1: a speculative verify step's k + 1 tokens at batch 1):
    # every row checked against F.linear of the same rows, the ratio taken against the
    # "linear" variant of the same row count, never a shape's best (the M = 1 question).
    rows: int = 1
    setting: str = ""        # a global torch switch held while checking and capturing


VARIANTS = [
    # 1. Today's path: W [N, K] row-major, F.linear -> mm(x, W.t()).
    Variant("linear", lambda x, w: F.linear(x, w)),
    # 2. The weight stored transposed, Wt [K, N] contiguous: cuBLAS sees the other layout.
    Variant("mm_wt", lambda x, wt: torch.mm(x, wt), prep=lambda w: (w.t().contiguous(),)),
    # 3. The gemv entry point: y[N] = W[N, K] @ x[K].
    Variant("mv", lambda x, w: torch.mv(w, x[0])[None]),
    # 4. x padded to M rows: cuBLAS's heuristic may pick another tile at M > 1.
    *[Variant(f"linear_m{m}", lambda x, w: F.linear(x, w), pad_m=m) for m in (2, 4, 8)],
    # 5. y^T[N, 1] = W[N, K] @ x^T[K, 1]: the weight is the A operand.
    Variant("matmul_w_xt", lambda x, w: torch.matmul(w, x.t()).t()),
    # 6. addmm with a (zero) bias: torch may route it to cuBLASLt's bias epilogue.
    Variant("linear_zero_bias", lambda x, w, b: F.linear(x, w, b),
            prep=lambda w: (w, w.new_zeros(w.shape[0]))),
    # 7. torch.backends.cuda.preferred_blas_library("cublaslt"): the Lt API for every mm.
    Variant("linear_cublaslt", lambda x, w: F.linear(x, w), setting="cublaslt"),
    # 8. allow_bf16_reduced_precision_reduction off: other split-K choices (down's reduce).
    Variant("linear_fp32_reduce", lambda x, w: F.linear(x, w),
            setting="no_reduced_reduction"),
    # 9. Not cuBLAS: our one-row Triton GEMV (layers/gemv.py, EngineConfig.skinny_gemv), its
    # tile table's pick and a few other tiles / split-K counts. Plain matmul here; in the model
    # it also carries the norm prologue and residual / SiLU·mul epilogues.
    *[Variant(name, functools.partial(_gemv_call, cfg=cfg), prep=_gemv_prep)
      for name, cfg in GEMV_CONFIGS.items()],
    # 10. M = 5 (k + 1 = 5 verify tokens): torch at M = 5 (the reference of the M = 5 cells),
    # and gemv_linear's multi-row kernel (layers/gemv_rows.py: each weight tile loaded once
    # for the 5 rows), its table's multi-row pick. Unmeasured until a GPU runs this.
    Variant(f"linear_rows{VERIFY_ROWS}", lambda x, w: F.linear(x, w), rows=VERIFY_ROWS),
    Variant(f"gemv_rows{VERIFY_ROWS}", functools.partial(_gemv_call, cfg=None), prep=_gemv_prep,
            rows=VERIFY_ROWS),
]


@contextlib.contextmanager
def torch_setting(name: str, cuda: bool):
    """Hold a global dispatch switch; restored after. The cuBLASLt preference cannot be set on
    a CPU build (it raises there), so the dry run runs that variant without it."""
    if name == "cublaslt" and cuda:
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
    elif name == "no_reduced_reduction":
        flags = torch.backends.cuda.matmul
        prev = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False
        try:
            yield
        finally:
            flags.allow_bf16_reduced_precision_reduction = prev
    else:
        yield


def shape_cases(shape: ModelShape) -> list:
    q_size = shape.num_attention_heads * shape.head_dim
    kv_size = shape.num_key_value_heads * shape.head_dim
    return bsm.cases(shape.hidden_size, q_size, kv_size, shape.intermediate_size,
                     shape.vocab_size)


def run_shape(case, variants, dtype, device, args, copy_gbs) -> list[dict]:
    """One row per variant for this (N, K): linear first (it is the reference), then the rest."""
    cuda = device.type == "cuda"
    n, k = case.weight_rows, case.k            # gate_up: the merged [2 I, K] weight
    elem = torch.empty((), dtype=dtype).element_size()
    w_bytes = n * k * elem
    ops = bsm.make_operands(case, 1, dtype, device, gpu_timing.weight_copies(w_bytes, cuda))
    x = ops["x"]                                # (1, K)
    tol = TOLERANCE[dtype]
    want, rows = None, []
    # rows x: x's row first, then random ones (seeded), for the multi-row cells.
    g = torch.Generator().manual_seed(1)
    x_rows = {m: torch.cat([x, torch.randn(m - 1, k, generator=g).to(dtype).to(device)])
              for m in {v.rows for v in variants if v.rows > 1}}
    want_rows = {}            # rows -> F.linear of x_rows[rows], the multi-row reference
    for v in variants:
        row = {"case": case.name, "n": n, "k": k, "variant": v.name, "pad_m": v.pad_m,
               "rows": v.rows, "weight_bytes": w_bytes}
        rows.append(row)
        try:
            with torch_setting(v.setting, cuda):
                xv = x_rows.get(v.rows, x)
                if v.pad_m > 1:                 # (pad_m, K): row 0 is x, the others zero
                    xv = torch.zeros(v.pad_m, k, dtype=dtype, device=device)
                    xv[0] = x[0]
                operands = [v.prep(w) for w in ops["weights"]]
                fns = [lambda o=o, v=v, xv=xv: v.call(xv, *o) for o in operands]
                got = fns[0]()[:v.rows].float()     # (rows, N)
                if tuple(got.shape) != (v.rows, n):
                    raise ValueError(f"result shape {tuple(got.shape)}, expected ({v.rows}, {n})")
                if want is None:
                    want = got
                ref = want
                if v.rows > 1:
                    if v.rows not in want_rows:
                        want_rows[v.rows] = F.linear(xv, ops["weights"][0]).float()
                    ref = want_rows[v.rows]
                diff = (got - ref).abs().max().item()
                row["max_abs_diff"] = diff
                row["equal"] = bool(torch.allclose(got, ref, rtol=tol, atol=tol))
                if not row["equal"]:
                    raise ValueError(f"result differs from {variants[0].name}: max abs diff "
                                     f"{diff:.3g} (tolerance {tol})")
                us, in_graph = gpu_timing.time_us(fns, args.iters, args.reps, cuda)
            del operands, fns
        except Exception as exc:  # one failing variant must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if want is None:      # no reference: nothing else of this shape can be checked
                break
            continue
        gbs = w_bytes / us / 1e3
        row.update(us=round(us, 3), gbs=round(gbs, 1), frac_copy=round(gbs / copy_gbs, 3),
                   cuda_graph=in_graph)
    us = {r["variant"]: r.get("us") for r in rows}
    for row in rows:   # against linear at the same row count
        base = us.get("linear" if row["rows"] == 1 else f"linear_rows{row['rows']}")
        if base and "us" in row:
            row["ratio"] = round(row["us"] / base, 3)
    return rows


def best_per_case(rows: list[dict]) -> dict:
    """case -> (linear row, fastest timed row), for the cases that have both."""
    out = {}
    for name in dict.fromkeys(r["case"] for r in rows):
        timed = [r for r in rows if r["case"] == name and "us" in r and r.get("rows", 1) == 1]
        base = next((r for r in timed if r["variant"] == "linear"), None)
        if base is not None:
            out[name] = (base, min(timed, key=lambda r: r["us"]))
    return out


def summary(rows: list[dict], num_layers: int) -> dict | None:
    """A token's five matmuls: (qkv + o_proj + gate_up + down) x layers + lm_head, with linear
    everywhere and with each shape's best variant; None until every shape has both."""
    best = best_per_case(rows)
    if any(name not in best for name in PER_LAYER + ("lm_head",)):
        return None
    layer = [sum(best[name][i]["us"] for name in PER_LAYER) for i in (0, 1)]
    token = [num_layers * layer[i] + best["lm_head"][i]["us"] for i in (0, 1)]
    return {"num_layers": num_layers, "layer_linear_us": round(layer[0], 3),
            "layer_best_us": round(layer[1], 3), "token_linear_us": round(token[0], 3),
            "token_best_us": round(token[1], 3), "token_saving_us": round(token[0] - token[1], 3),
            "best": {name: b["variant"] for name, (_, b) in best.items()}}


def format_table(rows: list[dict], variants, copy_gbs: float, num_layers: int) -> str:
    """Variants down, shapes across: us (ratio to linear); then the per-token estimate."""
    names = list(dict.fromkeys(r["case"] for r in rows))
    cell = {(r["case"], r["variant"]): r for r in rows}
    lines = [f"copy bandwidth {copy_gbs:,.0f} GB/s; cells: us per call (time / linear)",
             f"{'variant':28s} | " + " | ".join(f"{n:>16s}" for n in names)]
    for v in variants:
        cells = []
        for name in names:
            r = cell.get((name, v.name), {})
            cells.append(f"{r['us']:9.2f} ({r['ratio']:4.2f})" if "ratio" in r else
                         f"{'error' if 'error' in r else '-':>16s}")
        lines.append(f"{v.name:28s} | " + " | ".join(cells))
    best = best_per_case(rows)
    lines.append(f"{'best: GB/s (% copy)':28s} | " + " | ".join(
        f"{best[n][1]['gbs']:9,.0f} ({best[n][1]['frac_copy']:4.0%})" if n in best
        else f"{'-':>16s}" for n in names))
    lines.append("best: " + ", ".join(f"{n} {b['variant']} ({b['ratio']:.2f})"
                                      for n, (_, b) in best.items()))
    s = summary(rows, num_layers)
    if s is None:
        lines.append("per-token estimate: incomplete (see the JSON errors)")
    else:
        lines.append(f"per layer (qkv+o_proj+gate_up+down): linear {s['layer_linear_us']:.2f} "
                     f"us, best {s['layer_best_us']:.2f} us; x{num_layers} + lm_head: "
                     f"{s['token_linear_us']:.1f} -> {s['token_best_us']:.1f} us: a token "
                     f"would save {s['token_saving_us']:.1f} us")
    return "\n".join(lines)


def write_json(path, meta: dict, rows: list[dict], num_layers: int) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta, rows=rows, summary=summary(rows, num_layers)), f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write every row and the summary as JSON here")
    p.add_argument("--variants", default="",
                   help="comma-separated subset (linear is always run first: the reference)")
    p.add_argument("--iters", type=int, default=64, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays; the median is kept")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: tiny shapes, float32, one timed call each")
    args = p.parse_args(argv)
    known = {v.name: v for v in VARIANTS}
    wanted = [w for w in args.variants.split(",") if w]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        print(f"bench_gemv_layouts: unknown variant {unknown[0]!r}; known: "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if not wanted or v.name in wanted or v.name == "linear"]
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not wanted:  # the interpreter takes ~10 s a gemv tile: the table's only
        # (its one-row and its multi-row pick)
        variants = [v for v in variants if not v.name.startswith("gemv_") or v.rows > 1]
    if not cuda and not args.dry_run:
        print("bench_gemv_layouts: needs a CUDA device (--dry-run runs the CPU smoke test)",
              file=sys.stderr)
        return 2
    if not cuda:  # the gemv variants' Triton kernel runs in the interpreter on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPE_1B if cuda else SHAPE_TINY
    if not cuda:
        args.iters = args.reps = 1
    copy_gbs = gpu_timing.copy_bandwidth_gbs(device, cuda)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
            "torch": torch.__version__, "dtype": str(dtype), "dry_run": not cuda,
            "shape": shape.name, "copy_gbs": copy_gbs, "iters": args.iters, "reps": args.reps,
            "variants": [v.name for v in variants]}
    rows = []
    for case in shape_cases(shape):
        new = run_shape(case, variants, dtype, device, args, copy_gbs)
        rows += new
        done = [f"{r['variant']} {r['us']:.2f}" if "us" in r else f"{r['variant']} ERROR"
                for r in new]
        print(f"[gemv] {case.name} {case.weight_rows}x{case.k}: {', '.join(done)} us",
              file=sys.stderr, flush=True)
        write_json(args.out, meta, rows, shape.num_hidden_layers)  # a cut run keeps its rows
    print(f"{meta['device']}  {meta['dtype']}  torch {torch.__version__}  iters={args.iters}")
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['case']} {r['variant']}: {r['error']}")
    print(format_table(rows, variants, copy_gbs, shape.num_hidden_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
