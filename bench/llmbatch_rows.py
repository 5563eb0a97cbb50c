"""llmbatch's rows of bench.run: one engine per system (the bf16 defaults, an A/B variant of
bench/variants.py, a quantized method), built, warmed up, run through its workloads and freed.
Each throughput workload runs --repeats times on the engine (num_repeats: 3 on CUDA, 1 on the
CPU) and is reported as its median run (llmbatch_runner.summarize_repeats); W-SPEC runs once.

bench/run.py parses the CLI and drives the run; bench/recorder.py holds the results file.
"""

from __future__ import annotations

import argparse
import functools
import os
import traceback

from bench import llmbatch_runner, spec_run
from bench.recorder import Recorder, attempt, free_cuda, log
from bench.variants import AB_VARIANTS

# --quantization values -> the engine's quantization method; "bf16" is the unquantized model in
# the run's dtype (bfloat16 on CUDA, float32 on the CPU dry run). nf4-triton: nf4 on our Triton
# w4a16 GEMM (EngineConfig.nf4_triton_gemm, opt-in) instead of bitsandbytes.
QUANT_METHODS = {"bf16": "none", "nf4": "nf4", "int8": "int8", "nf4-triton": "nf4"}
# Quantized engines run only these (BENCH.md: memory and tok/s beside bf16).
QUANT_WORKLOADS = ("W-RANDOM", "W-BATCH1")
# The A/B engine without fused kernels (EngineConfig.fused_kernels=False) runs these: every
# throughput workload gets a row beside the default (fused) one.
FUSED_WORKLOADS = ("W-RANDOM", "W-PREFIX", "W-BATCH1")


def num_repeats(args: argparse.Namespace, device: str) -> int:
    """--repeats, else 3 on CUDA (stop 20's H200 figures moved 4-10 % between engines and calls;
    llmbatch's workloads take ~3 s an engine there) and 1 on the CPU (the dry run stays fast)."""
    if args.repeats is not None:
        return args.repeats
    return 3 if device.startswith("cuda") else 1


def _run_repeated(engine, workload, repeats: int, reset, by: str = "out_tok_per_s") -> dict:
    """`workload` `repeats` times on `engine`, summarized as its median run by `by` (TPOT for
    W-BATCH1). The prefix cache is reset before each run: a repeated W-PREFIX would otherwise
    hit the previous run's KV."""
    runs = []
    for _ in range(repeats):
        if callable(reset):
            reset()
        runs.append(llmbatch_runner.run_workload(engine, workload))
    return llmbatch_runner.summarize_repeats(runs, by=by)


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
    stats = rec.results[setup_key]["stats"]
    gemv_error = stats.get("skinny_gemv_error")
    if gemv_error and stats.get("skinny_gemv_active"):
        # Only the multi-row launches failed (gemv_check.gemv_rows_after_check): one-token
        # steps keep the gemv layers, steps of 2..gemv_max_rows tokens leave them.
        log(f"{system}: multi-row gemv OFF (gemv_max_rows back to 1, one-token steps keep "
            f"the gemv layers), its start-up check failed: {gemv_error}")
    elif gemv_error:   # the default-on gemv layers failed their start-up check: rows without
        log(f"{system}: gemv layers OFF, their start-up check failed: {gemv_error}")
    # A clean prefix cache per workload when the engine offers it; otherwise the canonical order
    # keeps W-PREFIX clean (see bench.run's parse_args) and later workloads' hits only shorten
    # their TTFT.
    reset = getattr(engine, "reset_prefix_cache", None)
    rec.results[setup_key]["prefix_cache_reset_per_workload"] = callable(reset)
    repeats = num_repeats(args, device)
    for name, w in workloads.items():
        if name == "W-SPEC":   # runs once: it repeats nothing the --repeats rows measure
            if callable(reset):
                reset()
            attempt(rec, name, system, lambda: spec_run.run_spec(engine, w, vocab))
        else:
            by = "tpot_s" if name == "W-BATCH1" else "out_tok_per_s"
            attempt(rec, name, system, functools.partial(_run_repeated, engine, w, repeats,
                                                         reset, by))
    if args.profile:
        _profile(args, rec, engine, system, workloads, reset)
    # reset is a bound method: it holds the engine too (it made cuda_bytes_after_free report
    # the whole engine, ~36.9 GB on the H200, as still allocated in stops 9-13).
    del engine, reset
    free_cuda()
    rec.results[setup_key]["cuda_bytes_after_free"] = _cuda_allocated()
    rec.save()


def _cuda_allocated():
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None
