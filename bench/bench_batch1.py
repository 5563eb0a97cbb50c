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
                         (greedy_argmax.TRITON_ARGMAX, on by default on CUDA)
    attention ...        the decode attention's split count forced to 8 or 32 (the heuristic
                         gives 16 at batch 1), or its key tile at 32 or 128 (default 64)
    sync scheduling      engine.async_scheduling off (the default is on for CUDA)
    skinny gemv flipped  one-token steps on layers/gemv.py's layers (EngineConfig.skinny_gemv,
                         auto-on on CUDA since stop 17) turned off, or on where the engine
                         has them off; the row's detail says which
    gemv weights before the PDL wait   layers/gemv.py's weight prefetch (set_weight_prefetch:
                         each gemv program loads its first weight tile before griddepcontrol.wait,
                         overlapping the previous kernel) flipped: measured in stop 19 (H200:
                         0.948 vs 0.972 ms, 1.025x, same tokens), an engine default since
                         (EngineConfig.gemv_weight_prefetch="tile"), so the row turns it off
    gemv tiles of stop 17   layers/gemv_config.py's table swapped for stop 17's single row
                         (16 x 512, 4 warps, no split, 3 stages on every shape) against stop
                         19's per-shape rows (qkv 8 x 512, o_proj 4 stages, down 8 x 1024;
                         measured per call only, ~35 us a token by their sum); down's 1024
                         chunks sum in another order, so its tokens may differ
    gemv weights into L2 before the PDL wait   set_weight_prefetch_l2: each program's whole
                         weight slice prefetched into L2 there too (CUDA; on top of the
                         default first-tile prefetch: "both"), flipped (default off)
    PDL flipped          programmatic dependent launch of our Triton kernels (runtime/pdl.py,
                         EngineConfig.pdl, auto-on for sm_90+ since stop 17) off, or on
    rotary in attention flipped   decode steps rotate q/k, store K/V and attend in one launch
                         (EngineConfig.rotary_in_attention): measured in stop 19 (H200: 0.958
                         ms, 1.015x), an engine default since, so the row turns it off (on
                         where the engine has it off)
    graph logits flipped   decode graphs of <= 16 tokens run the LM head and the greedy
                         argmax too (EngineConfig.graph_logits, runtime/graph_logits.py; an
                         engine default from stop 23, unmeasured then), so the row turns it
                         off: the eager LM head and argmax after each replay, as before
    L2 prefetch plans    models/llama_prefetch.py PrefetchPlan: o_proj; o_proj + next qkv;
                         + the first 8 / 16 MiB of gate_up

After the single options and before the last defaults row, one row combines the winners
(combine_winners): each option at least WIN_MARGIN faster than the first row, with no errors,
the fastest of each group that cannot stack (one L2 prefetch plan, one split count, one key
tile). Options may not add up (PDL and the prefetch side stream both touch launch timing), so
the default-to-be is measured as a whole in the same run.

First, on a CUDA device, W-BATCH1 on the defaults with CUDA events around every step
(runtime/device_timing.py): device time a step of the forward and of the sampling, and the
device's idle gap between steps, against the TPOT. A gap near TPOT minus the step's device
time says the host is on the critical path (stop 20 saw ~70 us a token between TPOT and the
host's step time, cause unknown). Idle inside a step (the host still enqueueing it) counts as
forward or sampling, so the line also gives the decode graph replayed back to back: its
device-only time. Not a row: the events cost a few us of host time a step.

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
# The rows (options, combine_winners) live in bench/batch1_options.py.
from bench.batch1_options import DEFAULTS, WIN_MARGIN, WINNERS, combine_winners, options
from bench.environment import environment
from bench.model_shapes import get_shape, make_checkpoint
from bench.workloads import build


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
    runner.graph_logits_error = None
    runner.graph_runner = runner._maybe_capture_decode_graphs()
    # The prefill graphs (engine.prefill_graph_max_tokens, off by default) bake the kernel
    # paths in too: recaptured alike, so a row's TTFT is its options' as well.
    runner.prefill_graph_runner = None
    runner.prefill_graph_error = None
    runner.prefill_graph_runner = runner._maybe_capture_prefill_graphs()


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
            "graph_logits_error": engine.stats().get("graph_logits_error"),
            "_outputs": res["_outputs"]}


def graph_replay_us(runner, reps: int = 50):
    """Device us of one replay of the batch-1 decode graph, replayed `reps` times back to back
    (the host only enqueues, so the device never waits for it): the graph's device-only time.
    The staged inputs are the last step's, so each replay rewrites that step's K/V slot with
    the same values. None without a captured batch-1 graph (CPU, graphs off)."""
    import torch

    graphs = getattr(getattr(runner, "graph_runner", None), "_graphs", {})
    graph = graphs.get((1, 1))
    if graph is None:
        return None
    graph.replay()   # warm
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def device_timing_pass(engine, workload, make_event=None) -> dict:
    """W-BATCH1 on the engine as it is, with every step timed on the device; us a step.
    make_event: the event factory (tests fake CUDA events; None: CUDA events)."""
    from llmbatch.runtime import device_timing

    recapture(engine)
    llmbatch_runner.run_workload(engine, workload, workload.requests[:1])  # warm graphs
    if make_event is None:
        device_timing.enable(engine.runner)
    else:
        device_timing.enable(engine.runner, make_event)
    try:
        res = llmbatch_runner.run_workload(engine, workload)
    finally:
        device_timing.disable(engine.runner)
    d = res["engine_stats_delta"]
    out = {"tpot_s": res["tpot_s"], "device_timed_steps": d.get("device_timed_steps"),
           "graph_replay_back_to_back_us": graph_replay_us(engine.runner)}
    for kind in device_timing.KINDS:
        n = d.get(f"{kind}_steps") or 0
        out[f"{kind}_steps"] = n
        names = [f"{kind}_device_{part}" for part in device_timing.PARTS]
        for name in names + [f"{kind}_launch", f"{kind}_step"]:   # device, then host
            out[f"{name}_us_per_step"] = (d.get(f"{name}_s", 0.0) / n * 1e6) if n else None
    return out


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

    if device == "cuda":
        try:
            t = out["device_timing"] = device_timing_pass(engine, workload)
            save()
            g = {part: t[f"graph_{part}_us_per_step"] for part in
                 ("device_forward", "device_sample", "device_gap", "launch", "step")}
            if t["graph_steps"]:
                print(f"batch1 device time a graph step (CUDA events): forward "
                      f"{g['device_forward']:.1f} us, sampling {g['device_sample']:.1f} us, "
                      f"idle gap before it {g['device_gap']:.1f} us; host: launch "
                      f"{g['launch']:.1f} us, step {g['step']:.1f} us; TPOT "
                      f"{t['tpot_s'] * 1e6:.1f} us; decode graph alone (with the LM head "
                      "and argmax where graph_logits is on), back to back: "
                      + (f"{t['graph_replay_back_to_back_us']:.1f} us"
                         if t["graph_replay_back_to_back_us"] is not None else "n/a")
                      + " (forward and sampling include device idle while the host "
                        "enqueues; the gap is a lower bound)", flush=True)
        except Exception as exc:   # a diagnostic: never costs the rows above
            traceback.print_exc()
            out["device_timing"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            print(f"batch1 device timing ERROR {type(exc).__name__}: {exc}", flush=True)
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
