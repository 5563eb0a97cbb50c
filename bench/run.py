"""Run the BENCH.md workloads for llmbatch and the transformers peers; JSON + one table last.

    python -m bench.run --shape 1b --out bench_out                       # the benchmark (GPU)
    python -m bench.run --shape tiny --device cpu --scale 0.05 --out /tmp/b   # CPU dry run
    python -m bench.run --quantization bf16,nf4,int8 ...   # + quantized W-RANDOM and W-BATCH1
    python -m bench.run --unfused ...   # + W-RANDOM, W-PREFIX, W-BATCH1 as llmbatch-unfused (CUDA)
    python -m bench.run --async-scheduling ...  # + the same three as llmbatch-async
    python -m bench.run --skinny ...             # + the same three as llmbatch-skinny (CUDA)
    python -m bench.run --pdl ...   # + the same three as llmbatch-pdl (PDL launches; CUDA)
    python -m bench.run --skinny-pdl ...   # + the same three as llmbatch-skinny-pdl (CUDA)
    python -m bench.run --l2-prefetch ...   # + the same three as llmbatch-l2prefetch (CUDA)
    python -m bench.run --skinny-gemv[-pdl] ...   # + llmbatch-skinny-gemv[-pdl] (CUDA)
    python -m bench.run --old-defaults ...   # + llmbatch-old-defaults: stop 17's engine (CUDA)
    python -m bench.run --prev-defaults ...  # + llmbatch-prev-defaults: stop 18's (CUDA)
    python -m bench.run --no-gemv ... / --no-pdl ...   # + the default with one of them off
    python -m bench.run --skinny-spec ...   # + W-SPEC with skinny_matmul (verify steps; CUDA)
    python -m bench.run --repeats 5 ...   # each llmbatch workload 5 times, the median reported

Order: llmbatch first (its KV pool sizes itself from free memory), then it is freed and the
peers load the same checkpoint. Every figure is written to OUT/results.json as soon as it
exists, so a run cut short still leaves what it measured. Exit status 1 when any run failed
or llmbatch generated a wrong number of tokens; the table is printed either way.

Here: the CLI, the peers' rows, the run order and the table. llmbatch's rows (one engine per
system, --repeats, --profile) are in bench/llmbatch_rows.py; the results file, the log line
and the error-tolerant measurement both share are in bench/recorder.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import floor as floor_mod
from bench import peers, report
from bench.environment import environment
from bench.llmbatch_rows import (FUSED_WORKLOADS, QUANT_METHODS, QUANT_WORKLOADS, num_repeats,
                                 run_llmbatch)
from bench.recorder import Recorder, attempt, free_cuda, log
from bench.variants import add_variant_flags, wanted_variants
from bench.model_shapes import get_shape, make_checkpoint
from bench.workloads import WORKLOAD_NAMES, build

PEER_NAMES = ("hf-static", "hf-generate", "hf-cb")

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "1b"), default=None,
                   help="model shape (default: 1b on CUDA, tiny on CPU)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                   help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)}")
    p.add_argument("--out", default="bench_out", help="output directory for JSON")
    p.add_argument("--model-dir", default=None, help="checkpoint dir (default OUT/model-SHAPE)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--scale", type=float, default=1.0,
                   help="shrink every workload (0 < scale <= 1) for CPU dry runs")
    p.add_argument("--skip-peers", action="store_true", help="do not run transformers peers")
    p.add_argument("--skip-llmbatch", action="store_true", help="do not run llmbatch")
    p.add_argument("--peers", default=",".join(PEER_NAMES),
                   help=f"comma-separated subset of {','.join(PEER_NAMES)} (time control)")
    # 0.5, not the engine's 0.9: the peers run in the same process after llmbatch is freed, and
    # must still find room if the engine's memory were not fully returned. W-RANDOM needs ~13 GB.
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--quantization", default="bf16",
                   help=f"comma-separated subset of {','.join(QUANT_METHODS)}: llmbatch runs "
                        f"every workload unquantized (bf16) and {'/'.join(QUANT_WORKLOADS)} "
                        f"once per quantized method (system llmbatch-nf4, llmbatch-int8)")
    add_variant_flags(p, '/'.join(FUSED_WORKLOADS))
    p.add_argument("--repeats", type=int, default=None,
                   help="run W-RANDOM, W-PREFIX and W-BATCH1 this many times on each llmbatch "
                        "engine and report the median run, with every run and the spread in "
                        "the JSON (default: 3 on CUDA, 1 on the CPU; not the peers or W-SPEC)")
    p.add_argument("--profile", action="store_true",
                   help="after llmbatch's bf16 workloads, profile a 64-request W-RANDOM slice "
                        "and batch-1 decode (OUT/profile_llmbatch*.txt; GPU busy fraction "
                        "in results.json)")
    p.add_argument("--require-engine", action="store_true",
                   help="fail instead of skipping when llmbatch.runtime.engine is unavailable")
    args = p.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOAD_NAMES]
    if unknown or not names:
        p.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOAD_NAMES)}")
    # Always the canonical order: W-PREFIX must run before W-BATCH1/W-SPEC, whose seed-0 prompts
    # equal the first tokens of W-PREFIX's prefix 0 and would otherwise pre-fill its cache.
    args.workload_names = [w for w in WORKLOAD_NAMES if w in names]
    args.peer_names = [x.strip() for x in args.peers.split(",") if x.strip()]
    bad = [x for x in args.peer_names if x not in PEER_NAMES]
    if bad:
        p.error(f"unknown peer(s) {bad}; known: {', '.join(PEER_NAMES)}")
    args.quant_names = [q.strip() for q in args.quantization.split(",") if q.strip()]
    bad = [q for q in args.quant_names if q not in QUANT_METHODS]
    if bad or not args.quant_names:
        p.error(f"unknown quantization(s) {bad}; known: {', '.join(QUANT_METHODS)}")
    if not 0.0 < args.scale <= 1.0:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def run_peers(rec: Recorder, workloads: dict, model_dir: str, dtype: str, device: str,
              wanted: list[str]) -> None:
    if not wanted:
        return
    model, load_s = peers.load_hf_model(model_dir, dtype, device)
    rec.results["peers_setup"] = {"load_s": load_s}
    # Most important first, in case the time limit cuts the run: the static batcher, then
    # continuous batching (transformers' best; its stop() restores the attention implementation,
    # so plain generate still works after it), then batch-1 generate (~30 s on an H200).
    if "W-RANDOM" in workloads and "hf-static" in wanted:
        attempt(rec, "W-RANDOM", "hf-static",
                lambda: peers.run_static_generate(model, workloads["W-RANDOM"], device))
    for name in ("W-RANDOM", "W-PREFIX"):
        if name in workloads and "hf-cb" in wanted:
            attempt(rec, name, "hf-cb",
                    lambda: peers.run_continuous_batching(model, workloads[name], device))
    if "W-BATCH1" in workloads and "hf-generate" in wanted:
        attempt(rec, "W-BATCH1", "hf-generate",
                lambda: peers.run_batch1_generate(model, workloads["W-BATCH1"], device))
    del model
    free_cuda()


def failed_runs(results: dict) -> list[str]:
    """"WORKLOAD/SYSTEM" of each run that failed, produced errors or wrong lengths, in its
    reported (median) run or in any other repetition."""
    return [f"{w}/{s}" for w, runs in results["runs"].items() for s, r in runs.items()
            if "error" in r or r.get("num_errors") or r.get("num_wrong_lengths")
            or (r.get("repeats") or {}).get("num_failed")]


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = get_shape(args.shape or ("1b" if device.startswith("cuda") else "tiny"))
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype_bytes = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    os.makedirs(args.out, exist_ok=True)
    model_dir = args.model_dir or os.path.join(args.out, f"model-{shape.name}")

    results = {"env": environment(device), "shape": shape.name, "dtype": dtype,
               "scale": args.scale, "smoke_test_only": shape.name != "1b" or args.scale != 1.0,
               "llmbatch_repeats": num_repeats(args, device), "workloads": {}, "runs": {}}
    rec = Recorder(args.out, results)
    t0 = time.perf_counter()
    make_checkpoint(shape, model_dir, dtype=dtype, device=device)
    results["checkpoint_s"] = time.perf_counter() - t0
    log(f"checkpoint {model_dir} ({shape.name}, {dtype}) ready in {results['checkpoint_s']:.1f} s")

    ceilings = floor_mod.measure_ceilings(device, dtype)
    results["ceilings"] = ceilings.to_dict()
    log(f"ceilings on {ceilings.device}: copy {ceilings.bandwidth_bytes_per_s / 1e9:,.1f} GB/s, "
        f"matmul {ceilings.flops_per_s / 1e12:,.2f} TFLOP/s")
    workloads = {name: build(name, shape.vocab_size, args.scale) for name in args.workload_names}
    for name, w in workloads.items():
        info = w.summary()
        if name != "W-SPEC":
            info["floor"] = floor_mod.workload_floor(
                [len(r.prompt_token_ids) for r in w.requests],
                [r.max_new_tokens for r in w.requests], shape, dtype_bytes, ceilings,
                prompts=[r.prompt_token_ids for r in w.requests])
        results["workloads"][name] = info
        results["runs"][name] = {}
    rec.save()

    # Quantized engines last: if the time limit cuts the run, the bf16 figures and the peers
    # they are compared with are already in the JSON.
    if not args.skip_llmbatch and "bf16" in args.quant_names:
        run_llmbatch(args, rec, workloads, model_dir, dtype, device, shape.vocab_size, "bf16")
    if not args.skip_peers:
        run_peers(rec, workloads, model_dir, dtype, device, args.peer_names)
    if not args.skip_llmbatch:
        # Before the quantized engines: the A/B rows of the defaults.
        for variant in wanted_variants(args):
            run_llmbatch(args, rec, workloads, model_dir, dtype, device, shape.vocab_size,
                         "bf16", variant=variant)
        for quant in [q for q in args.quant_names if q != "bf16"]:
            run_llmbatch(args, rec, workloads, model_dir, dtype, device, shape.vocab_size, quant)

    rows = report.table_rows(results)
    results["table"] = rows
    rec.save()
    table = report.format_table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    failed = failed_runs(results)
    label = "SMOKE TEST (not a benchmark figure)" if results["smoke_test_only"] else "benchmark"
    print(f"\n{label}: shape {shape.name}, {dtype}, {results['env'].get('gpu', device)}, "
          f"scale {args.scale}; JSON in {rec.path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    print(table, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
