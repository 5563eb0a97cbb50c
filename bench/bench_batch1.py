"""W-BATCH1 under several decode options, on one engine: which to make the default.

    python -m bench.bench_batch1 --model-dir DIR [--out results_dir]       # GPU, the 1B shape
    python -m bench.bench_batch1 --dry-run --out /tmp/b     # CPU smoke run: tiny shape, 5 %
    python -m bench.bench_batch1 --all ...    # + the options measured slower in stops 13 / 17

bench.run measures the defaults (and an option per A/B row, ~20 s each); this sweep measures
batch-1 decode under each option of OPTIONS for ~30 s of GPU time: the engine loads once, and
for each row the option is applied, the decode CUDA graphs recaptured (options are baked into
them), a short request warms them up, and W-BATCH1 runs. The defaults run first and last
(A ... A): the spread of those two is the noise floor of the other rows. Every row records
whether its greedy tokens equal the first row's (bf16 roundings may move with an option that
changes an order of summation; a touch into L2 or a table lookup must not change a token).

Options (each row is the defaults plus one change):
    rope table off       cos/sin computed per step (layers/rotary.py; the table is on on CUDA)
    split reduce fused   split-KV partials merged by the attention kernel's last split, no
                         second launch (TritonAttentionBackend.fused_split_reduce; opt-in)
    argmax in torch      greedy argmax as ~5 torch launches, not the 2 Triton ones
                         (sampler.TRITON_ARGMAX, on by default on CUDA)
    attention ...        the decode attention's split count forced to 8 or 32 (the heuristic
                         gives 16 at batch 1), or its key tile at 32 or 128 (default 64)
    sync scheduling      engine.async_scheduling off (the default is on for CUDA)
    skinny gemv flipped  one-token steps on layers/gemv.py's layers (EngineConfig.skinny_gemv,
                         auto-on on CUDA since stop 17) turned off, or on where the engine
                         has them off; the row's detail says which
    gemv weights before the PDL wait   layers/gemv.py's weight prefetch (set_weight_prefetch:
                         each gemv program loads its first weight tile before griddepcontrol.wait,
                         overlapping the previous kernel; opt-in, unmeasured)
    gemv weights into L2 before the PDL wait   set_weight_prefetch_l2: its whole weight slice
                         prefetched into L2 there instead (CUDA; opt-in, unmeasured)
    PDL flipped          programmatic dependent launch of our Triton kernels (runtime/pdl.py,
                         EngineConfig.pdl, auto-on for sm_90+ since stop 17) off, or on
    L2 prefetch plans    models/llama_prefetch.py PrefetchPlan: o_proj; o_proj + next qkv;
                         + the first 8 / 16 MiB of gate_up

After the single options and before the last defaults row, one row combines the winners
(combine_winners): each option at least WIN_MARGIN faster than the first row, with no errors,
the fastest of each group that cannot stack (one L2 prefetch plan, one split count, one key
tile). Options may not add up (PDL and the prefetch side stream both touch launch timing), so
the default-to-be is measured as a whole in the same run.

Writes OUT/bench_batch1.json after every row (a run cut by its time limit keeps what ran);
prints one line per row: TPOT and the ratio to the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from bench import llmbatch_runner
from bench.environment import environment
from bench.model_shapes import get_shape, make_checkpoint
from bench.workloads import build

DEFAULTS = "defaults"
WINNERS = "winners combined"
WIN_MARGIN = 0.01   # a winner's TPOT is at most (1 - WIN_MARGIN) x the first row's
# Options that replace each other: only the fastest of a group joins the combined row.
EXCLUSIVE_GROUPS = ("L2 prefetch", "attention splits", "attention key tile")


def options(all_rows: bool = False):
    """(label, apply(engine, device) -> str detail, undo(engine)) per row, in order. By default
    the rows still open (gemv, its weight prefetch, PDL) between the two defaults rows; with
    all_rows (--all) also those measured slower or equal on an H200 in stops 13 and 17 (L2
    prefetch plans, split reduce fused, argmax in torch, rope table off, attention splits and
    key tiles, sync scheduling): 16 rows did not fit the sweep's 90 s in stop 17, whose closing
    defaults row (the noise check) was cut."""
    import torch

    from llmbatch.runtime.models.llama_prefetch import (PrefetchPlan, disable_l2_prefetch,
                                                        enable_l2_prefetch)

    def prefetch(**fields):
        plan = PrefetchPlan(**fields)

        def apply(engine, device):
            n = enable_l2_prefetch(engine.runner.model, device, plan=plan)
            return f"{n} weights touched"
        return (f"L2 prefetch {plan.label}", apply,
                lambda engine: disable_l2_prefetch(engine.runner.model))

    def rope_rotaries(engine):
        from llmbatch.runtime.layers.rotary import RotaryEmbedding

        return [m for m in engine.runner.model.modules() if isinstance(m, RotaryEmbedding)]

    saved = {}

    def rope_off(engine, device):
        for r in rope_rotaries(engine):
            saved[id(r)], r.table = r.table, None
        return "cos/sin computed per step"

    def rope_back(engine):
        for r in rope_rotaries(engine):
            r.table = saved.pop(id(r), r.table)

    def fused_reduce(on: bool):
        def switch(engine, device=None):
            engine.runner.attn_backend.fused_split_reduce = on
            return ""
        return switch

    def argmax_in_torch(engine, device):
        from llmbatch.runtime import sampler

        saved["argmax"], sampler.TRITON_ARGMAX = sampler.TRITON_ARGMAX, False
        return ""

    def argmax_back(engine):
        from llmbatch.runtime import sampler

        sampler.TRITON_ARGMAX = saved.pop("argmax", sampler.TRITON_ARGMAX)

    def attention(field: str, value: int):
        def apply(engine, device=None):
            backend = engine.runner.attn_backend
            saved[field] = getattr(backend, field, None)
            setattr(backend, field, value)
            return ""

        def undo(engine):
            setattr(engine.runner.attn_backend, field, saved.pop(field, None))
        label = {"num_kv_splits": "splits", "tile_n": "key tile"}[field]
        return f"attention {label} {value}", apply, undo

    def sync(engine, device):
        saved["async"], engine.async_scheduling = engine.async_scheduling, False
        return ""

    def sync_back(engine):
        engine.async_scheduling = saved.pop("async", engine.async_scheduling)

    # PDL and the gemv layers are on by default on sm_90+ since stop 17 (auto in EngineConfig),
    # off elsewhere or when the engine was built with them off: their rows FLIP the engine's
    # state (the detail says which way) and put it back exactly after.
    def llama_models(engine):
        from llmbatch.runtime.models.llama import LlamaModel

        return [m for m in engine.runner.model.modules() if isinstance(m, LlamaModel)]

    skinny_fields = ("use_skinny_matmul", "skinny_max_tokens", "skinny_pdl",
                     "skinny_gemv_counters")

    def save_skinny(engine):
        from llmbatch.runtime.layers.embedding import ParallelLMHead

        saved["skinny"] = [(m, {f: getattr(m, f, None) for f in skinny_fields})
                           for m in llama_models(engine)]
        saved["skinny"] += [(h, {"use_gemv": h.use_gemv}) for h in engine.runner.model.modules()
                            if isinstance(h, ParallelLMHead)]

    def restore_skinny(engine):
        for m, fields in saved.pop("skinny", []):
            for f, v in fields.items():
                setattr(m, f, v)

    def pdl_flip(engine, device):
        from llmbatch.runtime import pdl

        saved["pdl"] = pdl.enabled()
        save_skinny(engine)
        if saved["pdl"]:
            pdl.set_enabled(False)
        elif device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            return "needs sm_90 CUDA: not applied"
        else:
            pdl.set_enabled(True)
        for m in llama_models(engine):   # the skinny/gemv launches read their module's flag
            if m.use_skinny_matmul:
                m.skinny_pdl = pdl.enabled()
        return "off (engine default on)" if saved["pdl"] else "on (engine default off)"

    def pdl_back(engine):
        from llmbatch.runtime import pdl

        pdl.set_enabled(saved.pop("pdl", False))
        restore_skinny(engine)

    def gemv_flip(engine, device):
        from llmbatch.runtime import pdl
        from llmbatch.runtime.models.llama_skinny import (disable_skinny_matmul,
                                                          enable_skinny_matmul)

        save_skinny(engine)
        if any(getattr(m, "skinny_gemv_counters", None) is not None
               for m in llama_models(engine)):
            disable_skinny_matmul(engine.runner.model)
            return "off (engine default on)"
        if device.type != "cuda":   # the interpreter would run it on the CPU: not a figure
            return "needs CUDA: not applied"
        if not enable_skinny_matmul(engine.runner.model, pdl=pdl.enabled(), gemv_rows=True,
                                    small_steps=False):
            return "not applicable (quantized, sharded or not Llama-family): not applied"
        return "on (engine default off)"

    def gemv_prefetch(switch: str):
        """A row with one of layers/gemv.py's weight-prefetch switches on (set_weight_prefetch:
        the first tile into registers; set_weight_prefetch_l2: the slice into L2)."""
        def apply(engine, device):
            from llmbatch.runtime.layers import gemv

            if not hasattr(gemv, f"set_{switch}"):
                return f"layers/gemv.py has no {switch}: not applied"
            saved[switch] = getattr(gemv, f"{switch}_enabled")()
            getattr(gemv, f"set_{switch}")(True)
            if not any(getattr(m, "skinny_gemv_counters", None) is not None
                       for m in llama_models(engine)):
                return "the gemv layers are off: no effect"
            return ""

        def undo(engine):
            from llmbatch.runtime.layers import gemv

            if switch in saved:
                getattr(gemv, f"set_{switch}")(saved.pop(switch))
        return apply, undo

    nothing = (DEFAULTS, lambda engine, device: "", lambda engine: None)
    # The likeliest gains first: a run cut by its time limit keeps them (JSON after each row).
    open_rows = [("skinny gemv flipped", gemv_flip, restore_skinny),
                 ("gemv weights before the PDL wait", *gemv_prefetch("weight_prefetch")),
                 ("gemv weights into L2 before the PDL wait",
                  *gemv_prefetch("weight_prefetch_l2")),
                 ("PDL flipped", pdl_flip, pdl_back)]
    if not all_rows:
        return [nothing, *open_rows, nothing]
    return [nothing, *open_rows, prefetch(next_qkv=False), prefetch(),
            ("split reduce fused", fused_reduce(True), fused_reduce(False)),
            ("argmax in torch", argmax_in_torch, argmax_back),
            ("rope table off", rope_off, rope_back),
            prefetch(gate_up_mib=8.0), prefetch(gate_up_mib=16.0),
            attention("num_kv_splits", 8), attention("num_kv_splits", 32),
            attention("tile_n", 32), attention("tile_n", 128),
            ("sync scheduling", sync, sync_back), nothing]


def combine_winners(rows: list, opts: list):
    """The combined-winners option (label, apply, undo) from the finished single-option rows,
    or None when no option won. rows: the JSON rows so far, the first being the defaults;
    opts: the options() entries they ran (matched by label)."""
    base = rows[0].get("tpot_s") if rows and rows[0]["option"] == DEFAULTS else None
    if not base:
        return None
    by_label = {o[0]: o for o in opts}
    best: dict[str, dict] = {}
    for row in rows[1:]:
        tpot = row.get("tpot_s")
        if (row["option"] in (DEFAULTS, WINNERS) or row.get("error") or not tpot
                or row["num_errors"] or row["num_wrong_lengths"]
                or row["option"] not in by_label or tpot > base * (1 - WIN_MARGIN)):
            continue
        group = next((g for g in EXCLUSIVE_GROUPS if row["option"].startswith(g)),
                     row["option"])
        if group not in best or tpot < best[group]["tpot_s"]:
            best[group] = row
    chosen = [by_label[row["option"]] for row in sorted(best.values(),
                                                        key=lambda r: r["tpot_s"])]
    if not chosen:
        return None

    def apply(engine, device):
        details = []
        for label, opt_apply, _ in chosen:
            detail = opt_apply(engine, device)
            details.append(label + (f" ({detail})" if detail else ""))
        return " + ".join(details)

    def undo(engine):
        for _, _, opt_undo in reversed(chosen):
            opt_undo(engine)
    return WINNERS, apply, undo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None,
                   help="checkpoint dir (made here when missing); default OUT/model-<shape>")
    p.add_argument("--out", default="bench_out", help="directory for bench_batch1.json")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shape, W-BATCH1 at 5 %%, kernels under the Triton "
                        "interpreter: a smoke test of this script, never a figure")
    p.add_argument("--all", action="store_true",
                   help="also the options measured slower or equal in stops 13 and 17")
    return p.parse_args(argv)


def recapture(engine) -> None:
    """The decode CUDA graphs again, with the options applied now (no-op off CUDA). Also
    after a row whose capture failed (its row shows cuda_graph_error; the next one tries
    again)."""
    runner = engine.runner
    if runner.device.type != "cuda":
        return
    runner.graph_runner = None
    runner.cuda_graph_error = None
    runner.graph_runner = runner._maybe_capture_decode_graphs()


def run_row(engine, workload, label, apply, undo, device) -> dict:
    try:
        detail = apply(engine, device)
        t0 = time.perf_counter()
        recapture(engine)
        capture_s = time.perf_counter() - t0
        llmbatch_runner.run_workload(engine, workload, workload.requests[:1])  # warm graphs
        res = llmbatch_runner.run_workload(engine, workload)
    finally:
        undo(engine)
    return {"option": label, "detail": detail, "capture_s": capture_s,
            "tpot_s": res["tpot_s"], "wall_s": res["wall_s"], "num_errors": res["num_errors"],
            "num_wrong_lengths": res["num_wrong_lengths"],
            "cuda_graph_error": engine.stats().get("cuda_graph_error"),
            "_outputs": res["_outputs"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:   # before triton is first imported: kernels run on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_batch1: needs a CUDA device (--dry-run runs the CPU smoke test)",
              file=sys.stderr)
        return 2
    shape = get_shape("tiny" if args.dry_run else "1b")
    dtype = "float32" if args.dry_run else "bfloat16"
    os.makedirs(args.out, exist_ok=True)
    model_dir = args.model_dir or os.path.join(args.out, f"model-{shape.name}")
    make_checkpoint(shape, model_dir, dtype=dtype, device=device)
    workload = build("W-BATCH1", shape.vocab_size, 0.05 if args.dry_run else 1.0)
    # No prefix cache: every row prefills the prompt again under its own option (the same
    # request runs twice a row), so the token check covers prefill as well as decode.
    overrides = {"max_num_seqs": 1, "gpu_memory_utilization": 0.5, "prefix_caching": False}
    if args.dry_run:
        overrides["cpu_kv_cache_bytes"] = 16 << 20
    engine, load_s = llmbatch_runner.build_engine(model_dir, dtype, device, **overrides)
    rows = []
    out = {"env": environment(device), "shape": shape.name, "load_s": load_s,
           "smoke_test_only": args.dry_run, "rows": rows}
    first = None

    def save():
        with open(os.path.join(args.out, "bench_batch1.json"), "w") as f:
            json.dump(out, f, indent=1)

    opts = options(all_rows=True) if args.all else options()
    # The closing defaults row (the noise check) comes after the combined winners.
    closing = [opts.pop()] if len(opts) > 1 and opts[-1][0] == DEFAULTS else []

    def schedule():
        yield from opts
        winners = combine_winners(rows, opts)
        if winners is None:
            print(f"batch1 {WINNERS:<40} none: no option beat the defaults by "
                  f"{WIN_MARGIN:.0%}", flush=True)
        else:
            yield winners
        yield from closing

    for label, apply, undo in schedule():
        try:
            row = run_row(engine, workload, label, apply, undo, torch.device(device))
        except Exception as exc:   # one broken option must not cost the other rows
            traceback.print_exc()
            rows.append({"option": label, "error": f"{type(exc).__name__}: {exc}"})
            save()
            print(f"batch1 {label:<40} ERROR {type(exc).__name__}: {exc}", flush=True)
            continue
        outputs = row.pop("_outputs")
        first = outputs if first is None else first
        row["same_tokens_as_first"] = outputs == first
        rows.append(row)
        save()
        base = next((r["tpot_s"] for r in rows if r.get("tpot_s")), None)
        tpot = row["tpot_s"]
        print(f"batch1 {label:<40} TPOT "
              + (f"{tpot * 1e3:.3f} ms  {base / tpot:.3f}x first row" if tpot and base
                 else "n/a")
              + f"  same tokens {row['same_tokens_as_first']}  capture {row['capture_s']:.1f} s"
              + (f"  ({row['detail']})" if row["detail"] else "")
              + (f"  ERRORS {row['num_errors'] + row['num_wrong_lengths']}"
                 if row["num_errors"] or row["num_wrong_lengths"] else ""), flush=True)
    return 1 if any(r.get("error") or r["num_errors"] or r["num_wrong_lengths"]
                    for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
