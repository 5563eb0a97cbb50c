"""Micro-benchmark: layers/skinny_matmul.py against cuBLAS plus the unfused ops it replaces, on
the Llama-3.2-1B decode shapes (GPU only; not a test; W-BATCH1 tuning input).

    python -m bench.bench_skinny_matmul [--out skinny.json] [--m 1,4,16] [--no-sweep] [--pdl]
    python -m bench.bench_skinny_matmul --dry-run      # CPU smoke run: tiny shapes, interpreter

Cases (per decoder layer, tp = 1), each timed as "baseline" (the unfused ops with the same math:
today's Triton RMSNorm / SiLU·mul kernels, F.linear, a torch add), as "cublas" (F.linear
alone: how well cuBLAS streams the weight) and as "skinny" (one launch):
    qkv      2048 -> 3072              norm + linear          | skinny(norm prologue)
    o_proj   2048 -> 2048              linear + add           | skinny(residual epilogue)
    gate_up  2048 -> 2 x 8192          norm + linear + silu   | skinny(norm, SiLU·mul)
    down     8192 -> 2048              linear + add           | skinny(residual epilogue)
    lm_head  2048 -> 128256            linear                 | skinny(plain)
Timing: each op is captured `--iters` times in one CUDA graph (launch overhead out, as in the
engine's decode graphs) cycling through enough weight copies (>= 256 MB) that every launch reads
its weight from DRAM, not from the 50 MB L2; replayed `--reps` times, median per call. GB/s
counts the bytes each launch must move (weight + activations); "copy" is a device-to-device
copy of 1 GiB measured here, the practical bandwidth ceiling. The default tile config and a
small sweep are timed (split-K configs for qkv, o_proj and down); the best per row is marked.
--pdl times every skinny config again with programmatic dependent launch (sm_90+): within the
graph each launch may then overlap the previous one's tail. JSON (--out) has every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from bench.gpu_timing import copy_bandwidth_gbs, time_us, weight_copies

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    n: int         # output columns (I for gate_up)
    k: int
    kind: str      # plain | norm | residual | norm_gate_up

    @property
    def weight_rows(self) -> int:
        return 2 * self.n if self.kind == "norm_gate_up" else self.n

    def bytes_moved(self, m: int, elem: int) -> int:
        """Bytes one launch must read and write: weight, x, output, plus the residual read or
        the norm weight."""
        extra = m * self.n if self.kind == "residual" else (self.k if "norm" in self.kind else 0)
        return elem * (self.weight_rows * self.k + m * self.k + m * self.n + extra)


def cases(hidden, q_size, kv_size, inter, vocab) -> list[Case]:
    return [Case("qkv", q_size + 2 * kv_size, hidden, "norm"),
            Case("o_proj", hidden, q_size, "residual"),
            Case("gate_up", inter, hidden, "norm_gate_up"),
            Case("down", hidden, inter, "residual"),
            Case("lm_head", vocab, hidden, "plain")]


LLAMA_1B = cases(2048, 2048, 512, 8192, 128256)
TINY = cases(64, 64, 16, 96, 200)  # masked tails (n = 96, 200) in the dry run too


def sweep_configs(sm, case_name: str = "") -> list:
    """Alternatives to the (untuned) default table, timed beside it; the split-K ones only for
    the cases named in split_k_configs."""
    C = sm.SkinnyConfig
    # Each is one Triton compile per case (~1 s): kept few so the run fits BENCH_SKINNY_TIMEOUT.
    return [C(block_n=16, block_k=128, num_warps=4, num_stages=4),
            C(block_n=16, block_k=512, num_warps=4, num_stages=3),
            C(block_n=32, block_k=256, num_warps=4, num_stages=4),
            C(block_n=16, block_k=32, num_warps=4, num_stages=3, dot=False)
            ] + split_k_configs(sm, case_name)


def split_k_configs(sm, case_name: str) -> list:
    """Deterministic split-K (two launches: partial sums, then a fixed-order reduce with the
    epilogue) for the cases whose BLOCK_N 16 grid has ~one program per SM: down (K = 8192,
    128 programs each streaming 256 KB), o_proj (128) and qkv (192)."""
    C = sm.SkinnyConfig
    if case_name not in ("qkv", "o_proj", "down"):
        return []
    cfgs = [C(block_n=16, block_k=256, num_warps=4, num_stages=4, split_k=s) for s in (2, 4)]
    if case_name == "down":  # 32 chunks of K: 8 splits of 4 chunks, 512 programs
        cfgs.append(C(block_n=32, block_k=256, num_warps=4, num_stages=4, split_k=8))
    return cfgs


def make_operands(case: Case, m: int, dtype, device, copies: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    # One random weight, the other copies cloned: same values, different DRAM pages.
    w = rnd(case.weight_rows, case.k, scale=case.k ** -0.5)
    return {"weights": [w] + [w.clone() for _ in range(copies - 1)],
            "x": rnd(m, case.k), "norm_w": rnd(case.k, scale=0.1) + 1,
            "residual": rnd(m, case.n)}


def baseline_fn(case: Case, ops: dict, w):
    """The unfused chain with the same math (the engine's CUDA path today)."""
    import torch.nn.functional as F

    from llmbatch.runtime.layers import fused_kernels as fk

    x, norm_w, residual = ops["x"], ops["norm_w"], ops["residual"]
    if case.kind == "norm":
        return lambda: F.linear(fk.fused_rms_norm(x, norm_w, EPS), w)
    if case.kind == "residual":
        return lambda: F.linear(x, w) + residual
    if case.kind == "norm_gate_up":
        return lambda: fk.fused_silu_and_mul(F.linear(fk.fused_rms_norm(x, norm_w, EPS), w))
    return lambda: F.linear(x, w)


def linear_fn(ops: dict, w):
    import torch.nn.functional as F

    return lambda: F.linear(ops["x"], w)


def skinny_fn(case: Case, ops: dict, w, cfg, pdl: bool = False):
    from llmbatch.runtime.layers.skinny_matmul import skinny_linear

    kwargs = {"config": cfg, "pdl": True} if pdl else {"config": cfg}
    if "norm" in case.kind:
        kwargs.update(norm_weight=ops["norm_w"], eps=EPS)
    if case.kind == "residual":
        kwargs["residual"] = ops["residual"]
    kwargs["gate_up"] = case.kind == "norm_gate_up"
    return lambda: skinny_linear(ops["x"], w, **kwargs)


def run_case(case, m, dtype, device, args, copy_gbs, configs) -> list[dict]:
    cuda = device.type == "cuda"
    elem = torch.empty((), dtype=dtype).element_size()
    w_bytes = case.weight_rows * case.k * elem
    copies = weight_copies(w_bytes, cuda)
    ops = make_operands(case, m, dtype, device, copies)
    fused_bytes = case.bytes_moved(m, elem)
    want = baseline_fn(case, ops, ops["weights"][0])()
    rows = []
    variants = ([("baseline", None, False), ("cublas", None, False)]
                + [("skinny", cfg, False) for cfg in configs]
                + [("skinny", cfg, True) for cfg in configs if args.pdl])
    for system, cfg, pdl in variants:
        moved = fused_bytes
        if system == "cublas":  # weight + x + the (m, weight_rows) output
            moved = elem * (case.weight_rows * case.k + m * case.k + m * case.weight_rows)
        row = {"case": case.name, "m": m, "n": case.n, "k": case.k, "kind": case.kind,
               "system": system, "config": asdict(cfg) if cfg else None, "bytes": moved}
        if cfg is not None:
            row["pdl"] = pdl
        make = {"baseline": lambda w: baseline_fn(case, ops, w),
                "cublas": lambda w: linear_fn(ops, w),
                "skinny": lambda w: skinny_fn(case, ops, w, cfg, pdl)}[system]
        try:
            fns = [make(w) for w in ops["weights"]]
            if cfg is not None:
                row["max_abs_diff"] = (fns[0]().float() - want.float()).abs().max().item()
            us, in_graph = time_us(fns, args.iters, args.reps, cuda)
        except Exception as exc:  # one failing config must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            continue
        gbs = moved / us / 1e3
        row.update(us=round(us, 3), gbs=round(gbs, 1), frac_copy=round(gbs / copy_gbs, 3),
                   cuda_graph=in_graph)
        rows.append(row)
    return rows


def format_table(rows: list[dict], copy_gbs: float) -> str:
    """One line per (case, M): baseline, default skinny, best skinny config."""
    lines = [f"copy bandwidth {copy_gbs:,.0f} GB/s",
             "case    |  M | baseline us | cuBLAS alone us (% copy) | skinny default us | "
             "best us (GB/s, % copy) | speedup | best config"]
    keys = sorted({(r["case"], r["m"]) for r in rows},
                  key=lambda k: ([r["case"] for r in rows].index(k[0]), k[1]))
    for name, m in keys:
        group = [r for r in rows if (r["case"], r["m"]) == (name, m) and "us" in r]
        base = next((r for r in group if r["system"] == "baseline"), None)
        lin = next((r for r in group if r["system"] == "cublas"), {"us": 0, "frac_copy": 0})
        ours = [r for r in group if r["system"] == "skinny"]
        if not base or not ours:
            lines.append(f"{name:7s} | {m:2d} | no figure (see JSON errors)")
            continue
        best = min(ours, key=lambda r: r["us"])
        best["best"] = True
        c = best["config"]
        tiles = (f"n{c['block_n']} k{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
                 + ("" if c["dot"] else " fma")
                 + (f" split{c['split_k']}" if c["split_k"] > 1 else "")
                 + (" pdl" if best.get("pdl") else ""))
        lines.append(f"{name:7s} | {m:2d} | {base['us']:11.2f} | {lin['us']:15.2f} "
                     f"({lin['frac_copy']:4.0%}) | {ours[0]['us']:17.2f} | "
                     f"{best['us']:7.2f} ({best['gbs']:6,.0f}, {best['frac_copy']:4.0%}) | "
                     f"{base['us'] / best['us']:6.2f}x | {tiles}")
    lines += layer_estimate(rows)
    return "\n".join(lines)


def layer_estimate(rows: list[dict], num_layers: int = 16) -> list[str]:
    """Per M: the four per-layer cases summed (baseline vs best skinny), times the layers of
    Llama-3.2-1B: the matmul share of a decode step, launch gaps excluded (graph-timed)."""
    out = []
    per_layer = ("qkv", "o_proj", "gate_up", "down")
    for m in sorted({r["m"] for r in rows}):
        base = ours = 0.0
        for name in per_layer:
            group = [r for r in rows if r["case"] == name and r["m"] == m and "us" in r]
            b = [r["us"] for r in group if r["system"] == "baseline"]
            s = [r["us"] for r in group if r["system"] == "skinny"]
            if not b or not s:
                break
            base, ours = base + b[0], ours + min(s)
        else:
            out.append(f"M={m:2d}: 4 matmul cases of a layer {base:8.2f} -> {ours:8.2f} us; "
                       f"x{num_layers} layers {base * num_layers / 1e3:6.3f} -> "
                       f"{ours * num_layers / 1e3:6.3f} ms per step")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write every row as JSON here")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--m", default="1,4,16", help="comma-separated token counts (1..16)")
    p.add_argument("--iters", type=int, default=100, help="launches per CUDA graph")
    p.add_argument("--reps", type=int, default=5, help="graph replays; the median is kept")
    p.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    p.add_argument("--pdl", action="store_true",
                   help="also time every skinny config with programmatic dependent launch "
                        "(consecutive launches in the graph overlap; sm_90+; doubles the "
                        "skinny rows)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: tiny shapes, Triton interpreter, one call each")
    args = p.parse_args(argv)
    ms = [int(v) for v in args.m.split(",") if v]
    if not ms or any(not 1 <= m <= 16 for m in ms):
        print(f"bench_skinny_matmul: --m values must be in 1..16, got {args.m!r}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("bench_skinny_matmul: needs a CUDA device (--dry-run runs the CPU smoke test)",
              file=sys.stderr)
        return 2
    if args.pdl and not (cuda and torch.cuda.get_device_capability()[0] >= 9):
        print("bench_skinny_matmul: --pdl needs a CUDA device of compute capability 9.0+",
              file=sys.stderr)
        return 2
    if not cuda:  # read when triton is first imported, so before the kernel modules
        os.environ["TRITON_INTERPRET"] = "1"
    from llmbatch.runtime.layers import skinny_matmul as sm

    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    shapes = LLAMA_1B if cuda else TINY
    if not cuda:
        args.iters = args.reps = 1
    copy_gbs = copy_bandwidth_gbs(device, cuda)
    device_name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    rows = []
    for case in shapes:
        default = sm.pick_config(case.n, case.k, dtype)
        configs = [default]
        if not args.no_sweep:
            extra = sweep_configs(sm, case.name)
            if not cuda:  # dry run: the FMA tiles and the first split-K config
                extra = extra[3:4] + split_k_configs(sm, case.name)[:1]
            configs += [c for c in extra if c != default]
        for m in ms:
            new = run_case(case, m, dtype, device, args, copy_gbs, configs)
            rows += new
            us = [f"{r['system']} {r['us']:.2f}" for r in new if "us" in r]
            print(f"[skinny] {case.name} M={m}: {', '.join(us)} us", file=sys.stderr,
                  flush=True)
            # After every case: a run cut short by its timeout keeps its rows.
            write_json(args.out, device_name, dtype, not cuda, copy_gbs, args, rows)
    print(f"{device_name}  {args.dtype if cuda else 'float32'}  iters={args.iters}")
    print(format_table(rows, copy_gbs))
    write_json(args.out, device_name, dtype, not cuda, copy_gbs, args, rows)  # + "best" marks
    return 0


def write_json(path, device_name, dtype, dry_run, copy_gbs, args, rows) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"device": device_name, "dtype": str(dtype), "dry_run": dry_run,
                       "copy_gbs": copy_gbs, "iters": args.iters, "reps": args.reps,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
