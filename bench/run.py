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
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
import traceback

from bench import floor as floor_mod
from bench import llmbatch_runner, peers, report, spec_run
from bench.environment import environment
from bench.variants import AB_VARIANTS, add_variant_flags, wanted_variants
from bench.model_shapes import get_shape, make_checkpoint
from bench.workloads import WORKLOAD_NAMES, build

PEER_NAMES = ("hf-static", "hf-generate", "hf-cb")
# --quantization values -> the engine's quantization method; "bf16" is the unquantized model in
# the run's dtype (bfloat16 on CUDA, float32 on the CPU dry run). nf4-triton: nf4 on our Triton
# w4a16 GEMM (EngineConfig.nf4_triton_gemm, opt-in) instead of bitsandbytes.
QUANT_METHODS = {"bf16": "none", "nf4": "nf4", "int8": "int8", "nf4-triton": "nf4"}
# Quantized engines run only these (BENCH.md: memory and tok/s beside bf16).
QUANT_WORKLOADS = ("W-RANDOM", "W-BATCH1")
# The A/B engine without fused kernels (EngineConfig.fused_kernels=False) runs these: every
# throughput workload gets a row beside the default (fused) one.
FUSED_WORKLOADS = ("W-RANDOM", "W-PREFIX", "W-BATCH1")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def num_repeats(args: argparse.Namespace, device: str) -> int:
    """--repeats, else 3 on CUDA (stop 20's H200 figures moved 4-10 % between engines and calls;
    llmbatch's workloads take ~3 s an engine there) and 1 on the CPU (the dry run stays fast)."""
    if args.repeats is not None:
        return args.repeats
    return 3 if device.startswith("cuda") else 1


class Recorder:
    """Holds the results dict and rewrites OUT/results.json after every figure."""

    def __init__(self, out_dir: str, results: dict) -> None:
        self.path = os.path.join(out_dir, "results.json")
        self.results = results
        self.default_outputs: dict[str, dict] = {}   # workload -> llmbatch's greedy outputs

    def put(self, workload: str, system: str, value: dict) -> None:
        outputs = value.get("_outputs")
        if outputs is not None and system == "llmbatch":
            self.default_outputs[workload] = outputs
        elif outputs is not None and workload in self.default_outputs:
            # Every other llmbatch row (an A/B variant, a quantized engine) says how much of
            # the default's greedy output it reproduces before its first differing token:
            # bf16 rounding flips random-weight models late; a broken kernel flips at once.
            value["agreement_with_llmbatch"] = llmbatch_runner.fraction_on_truth(
                outputs, self.default_outputs[workload])
        value = {k: v for k, v in value.items() if not k.startswith("_")}
        self.results["runs"].setdefault(workload, {})[system] = value
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _attempt(rec: Recorder, workload: str, system: str, fn) -> None:
    """Run one measurement; a failure is recorded (with its message) and the bench goes on."""
    log(f"{workload} / {system} ...")
    try:
        value = fn()
    except Exception as exc:
        traceback.print_exc()
        value = {"error": f"{type(exc).__name__}: {exc}"}
    rec.put(workload, system, value)
    speed = value.get("out_tok_per_s")
    spread = value.get("repeats", {}).get("spread")
    runs = (f" (median of {value['repeats']['n']}, max-min {spread:.1%})"
            if spread is not None and value["repeats"]["n"] > 1 else "")
    log(f"{workload} / {system}: " + (f"{speed:,.1f} out tok/s{runs}" if speed else
                                      value.get("error", value.get("skipped", "done"))))


def _run_repeated(engine, workload, repeats: int, reset) -> dict:
    """`workload` `repeats` times on `engine`, summarized as its median run. The prefix cache is
    reset before each run: a repeated W-PREFIX would otherwise hit the previous run's KV."""
    runs = []
    for _ in range(repeats):
        if callable(reset):
            reset()
        runs.append(llmbatch_runner.run_workload(engine, workload))
    return llmbatch_runner.summarize_repeats(runs)


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _profile(args, rec, engine, system: str, workloads: dict, reset) -> None:
    for key, name, num, max_new, fname in llmbatch_runner.profile_slices(system, workloads):
        if callable(reset):
            reset()
        try:
            rec.results[key] = llmbatch_runner.profile_steps(
                engine, workloads[name], os.path.join(args.out, fname),
                num_requests=num, max_new=max_new)
            log(f"profile {name}: GPU busy {rec.results[key]['gpu_busy_fraction']:.2f} of "
                f"the wall time ({fname})")
        except Exception as exc:
            traceback.print_exc()
            rec.results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        rec.save()


def run_llmbatch(args, rec: Recorder, workloads: dict, model_dir: str, dtype: str,
                 device: str, vocab: int, quant: str = "bf16", variant: str = "") -> None:
    """One engine (quantization `quant`), warmed up, through its workloads, then freed.
    variant: "" (the defaults), or a name of bench/variants.py's AB_VARIANTS: one option of the
    unquantized engine changed, on FUSED_WORKLOADS or the variant's own workloads."""
    method = QUANT_METHODS[quant]
    system = "llmbatch" if method == "none" else f"llmbatch-{quant}"
    ab = AB_VARIANTS[variant] if variant else None
    if variant:
        system = f"llmbatch-{variant}"
    if method != "none" or variant:
        keep = (ab.workloads or FUSED_WORKLOADS) if ab is not None else QUANT_WORKLOADS
        workloads = {n: w for n, w in workloads.items() if n in keep}
        if not workloads:
            return
    if ab is not None and ab.cpu_skip and device == "cpu":
        # The CPU path never runs Triton kernels: the row would repeat llmbatch.
        for name in workloads:
            rec.put(name, system, {"skipped": ab.cpu_skip})
        return
    reason = llmbatch_runner.engine_unavailable_reason()
    if reason is not None:
        if args.require_engine:
            raise SystemExit(f"--require-engine: {reason}")
        log(reason)
        for name in workloads:
            rec.put(name, system, {"skipped": reason})
        return
    overrides = {"gpu_memory_utilization": args.gpu_memory_utilization, "quantization": method}
    if method == "nf4":  # the nf4 row measures BENCH.md's <= 0.30x: embedding + LM head in nf4 too
        overrides["quantize_embeddings"] = True
    if quant == "nf4-triton":
        overrides["nf4_triton_gemm"] = True
    if ab is not None:
        overrides.update(ab.overrides)
    if device == "cpu":
        overrides["cpu_kv_cache_bytes"] = 64 << 20     # a small pool: the dry run is tiny
    try:
        engine, load_s = llmbatch_runner.build_engine(model_dir, dtype, device, **overrides)
    except Exception as exc:  # e.g. bitsandbytes missing: the quantized rows say so
        if method == "none" and not variant:
            raise
        traceback.print_exc()
        for name in workloads:
            rec.put(name, system, {"error": f"{type(exc).__name__}: {exc}"})
        return
    warm_s = llmbatch_runner.warm_up(engine, vocab, args.scale)
    setup_key = "llmbatch_setup" if system == "llmbatch" else f"{system}_setup"
    rec.results[setup_key] = {"load_s": load_s, "warmup_s": warm_s, "stats": engine.stats()}
    rec.results[setup_key]["fused_kernels_active"] = getattr(
        getattr(engine, "runner", None), "fused_kernels_active", None)
    log(f"{system} loaded in {load_s:.1f} s, warmed up in {warm_s:.1f} s, weights "
        f"{llmbatch_runner.weight_bytes(engine) or 0:,} bytes")
    gemv_error = rec.results[setup_key]["stats"].get("skinny_gemv_error")
    if gemv_error:   # the default-on gemv layers failed their start-up check: rows without them
        log(f"{system}: gemv layers OFF, their start-up check failed: {gemv_error}")
    # A clean prefix cache per workload when the engine offers it; otherwise the canonical order
    # keeps W-PREFIX clean (see parse_args) and later workloads' hits only shorten their TTFT.
    reset = getattr(engine, "reset_prefix_cache", None)
    rec.results[setup_key]["prefix_cache_reset_per_workload"] = callable(reset)
    repeats = num_repeats(args, device)
    for name, w in workloads.items():
        if name == "W-SPEC":   # runs once: it repeats nothing the --repeats rows measure
            if callable(reset):
                reset()
            _attempt(rec, name, system, lambda: spec_run.run_spec(engine, w, vocab))
        else:
            _attempt(rec, name, system, functools.partial(_run_repeated, engine, w, repeats,
                                                          reset))
    if args.profile:
        _profile(args, rec, engine, system, workloads, reset)
    # reset is a bound method: it holds the engine too (it made cuda_bytes_after_free report
    # the whole engine, ~36.9 GB on the H200, as still allocated in stops 9-13).
    del engine, reset
    _free_cuda()
    rec.results[setup_key]["cuda_bytes_after_free"] = _cuda_allocated()
    rec.save()


def _cuda_allocated():
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


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
        _attempt(rec, "W-RANDOM", "hf-static",
                 lambda: peers.run_static_generate(model, workloads["W-RANDOM"], device))
    for name in ("W-RANDOM", "W-PREFIX"):
        if name in workloads and "hf-cb" in wanted:
            _attempt(rec, name, "hf-cb",
                     lambda: peers.run_continuous_batching(model, workloads[name], device))
    if "W-BATCH1" in workloads and "hf-generate" in wanted:
        _attempt(rec, "W-BATCH1", "hf-generate",
                 lambda: peers.run_batch1_generate(model, workloads["W-BATCH1"], device))
    del model
    _free_cuda()


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
