"""llmbatch's side of the benchmark: build one Engine, warm it up, run each workload through it.

Written against the runtime's public interface only (Engine, EngineConfig, Request,
SamplingParams, GenerationResult, engine.stats()). While llmbatch.runtime.engine cannot be
imported, `engine_unavailable_reason()` says why and the harness skips the llmbatch rows.
"""

from __future__ import annotations

import random
import time
from typing import Optional

from bench.workloads import MIN_TOKEN_ID, Workload

WARMUP_SEED = 12345       # warm-up prompts never share a token block with a workload's


def engine_unavailable_reason() -> Optional[str]:
    """None when the engine imports; else a one-line reason."""
    try:
        from llmbatch.runtime.engine import Engine  # noqa: F401
    except Exception as exc:  # ImportError, or an error raised while importing its parts
        return f"engine not available: {type(exc).__name__}: {exc}"
    return None


def build_engine(model_dir: str, dtype: str, device: str, **overrides):
    """Returns (engine, load seconds). `overrides` are EngineConfig fields."""
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model=model_dir, dtype=dtype, device=device, **overrides))
    return engine, time.perf_counter() - t0


def _requests(workload_requests, id_prefix: str):
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams

    # Greedy, EOS ignored: every request generates exactly its max_new_tokens.
    return [Request(f"{id_prefix}{i}", r.prompt_token_ids,
                    SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0,
                                   ignore_eos=True))
            for i, r in enumerate(workload_requests)]


def warm_up(engine, vocab: int, scale: float = 1.0) -> float:
    """A W-RANDOM-shaped batch of unrelated prompts, with short outputs; returns seconds.

    256 requests, prompts U[128, 1024], outputs U[8, 32] (each scaled like a workload): the
    step shapes of the workloads (full token budgets, mixed prefill/decode steps, decode
    batches up to max_num_seqs, contexts past 1k) compile their Triton specializations and
    load their cuBLAS kernels here, not inside the first timed workload. On the H200 (stop 9)
    the first engine of a run, after a 16-request warm-up, made 22-23k tok/s on W-RANDOM
    where the same configuration as a later engine of the run made 30-40k.

    Then one request alone (prompt 512, output 8, scaled): a prefill step of a single
    sequence, which no batch step above (nor W-RANDOM's, nor W-PREFIX's) ever is. On a GPU it
    launches new kernel variants (Triton turns the attention kernel's num_seqs == 1 into a
    constant, so it compiles or loads another binary; cuBLAS its kernels for M = 512), which
    otherwise landed inside the first W-BATCH1 request's TTFT."""
    from bench.workloads import BenchRequest, scaled

    rng = random.Random(WARMUP_SEED)
    reqs = []
    for _ in range(scaled(256, scale)):
        il, ol = rng.randint(128, 1024), rng.randint(8, 32)
        prompt = [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(scaled(il, scale))]
        reqs.append(BenchRequest(prompt, scaled(ol, scale)))
    lone = [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(scaled(512, scale))]
    t0 = time.perf_counter()
    for _ in engine.generate(_requests(reqs, "warmup-")):
        pass
    for _ in engine.generate(_requests([BenchRequest(lone, scaled(8, scale))], "warmup-lone-")):
        pass
    return time.perf_counter() - t0


def weight_bytes(engine):
    """Loaded weight bytes over all tensor-parallel ranks (engine.stats()), None if unknown."""
    per_rank = engine.stats().get("weight_bytes_per_rank")
    return sum(per_rank) if per_rank else None


def _stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after
            if isinstance(after.get(k), (int, float)) and isinstance(before.get(k), (int, float))
            and not isinstance(after[k], bool)}


def run_workload(engine, workload: Workload, requests=None) -> dict:
    """Time one workload from the first submission to the last result (checks every length)."""
    reqs = workload.requests if requests is None else requests
    engine_reqs = _requests(reqs, f"{workload.name}-")   # built before the clock starts
    expected = {f"{workload.name}-{i}": r.max_new_tokens for i, r in enumerate(reqs)}
    before = engine.stats()
    t0 = time.perf_counter()
    results = []
    for res in engine.generate(engine_reqs):
        results.append(res)
    wall = time.perf_counter() - t0
    after = engine.stats()

    errors = [f"{r.request_id}: {r.error}" for r in results if r.error]
    wrong = [f"{r.request_id}: {r.num_output_tokens} != {expected[r.request_id]}"
             for r in results if not r.error and r.num_output_tokens != expected[r.request_id]]
    if len(results) != len(reqs):
        errors.append(f"{len(results)} results for {len(reqs)} requests")
    out_tokens = sum(r.num_output_tokens for r in results)
    prompt_tokens = sum(r.num_prompt_tokens for r in results)
    cached = sum(r.num_cached_prompt_tokens for r in results)
    tpots = [r.tpot_s for r in results if r.tpot_s is not None]
    return {
        "system": "llmbatch", "quantization": after.get("quantization"),
        "weight_bytes": weight_bytes(engine),
        "weight_bytes_per_rank": after.get("weight_bytes_per_rank"),
        "wall_s": wall, "output_tokens": out_tokens,
        "out_tok_per_s": out_tokens / wall if wall > 0 else None,
        "num_prompt_tokens": prompt_tokens, "num_cached_prompt_tokens": cached,
        "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "tpot_s": (sum(tpots) / len(tpots)) if tpots else None,
        "ttft_s_mean": _mean([r.ttft_s for r in results]),
        "engine_stats_delta": _stats_delta(before, after),
        "errors": errors[:10], "num_errors": len(errors),
        "wrong_lengths": wrong[:10], "num_wrong_lengths": len(wrong),
        # Kept for W-SPEC's replay proposer: the true greedy continuations.
        "_outputs": {r.request_id: r.output_token_ids for r in results},
    }


def summarize_repeats(runs: list[dict], by: str = "out_tok_per_s") -> dict:
    """Repetitions of one workload on one engine -> the median run's dict, whole, so its TPOT,
    TTFT and outputs belong to the figure reported, plus "repeats": every run's out tok/s and
    TPOT in run order, min/max, spread = (max - min) of out tok/s / the median run's out tok/s
    (the median tok/s unless by TPOT), and how many runs failed or emitted other tokens than
    the median run. The median is by `by`: out tok/s, or
    "tpot_s" for W-BATCH1, whose figure is its TPOT (a run's tok/s there includes its TTFT).
    With an even count, the slower of the two middle runs. Why: stop 20's H200 figures moved
    4-10 % between engines and calls."""
    if not runs:
        raise ValueError("summarize_repeats needs at least one run")
    if by not in ("out_tok_per_s", "tpot_s"):
        raise ValueError(f"summarize_repeats: by must be out_tok_per_s or tpot_s, got {by!r}")
    speeds = [r.get("out_tok_per_s") for r in runs]
    # Slowest first: the lowest tok/s or the highest TPOT; a run without the figure (no
    # tokens) sorts first; stable, so ties keep their run order.
    figures = [r.get(by) for r in runs]
    if all(f is None for f in figures):   # no run measured a TPOT (no tokens after the first)
        by, figures = "out_tok_per_s", speeds
    sign = 1.0 if by == "out_tok_per_s" else -1.0
    order = sorted(range(len(runs)),
                   key=lambda i: float("-inf") if figures[i] is None else sign * figures[i])
    mid = order[(len(runs) - 1) // 2]
    median = dict(runs[mid])
    known = [s for s in speeds if s is not None]
    rep = {"n": len(runs), "median_index": mid, "out_tok_per_s": speeds}
    tpots = [r.get("tpot_s") for r in runs]
    if any(t is not None for t in tpots):
        rep["tpot_s"] = tpots
    rep["min_out_tok_per_s"] = min(known) if known else None
    rep["max_out_tok_per_s"] = max(known) if known else None
    rep["spread"] = ((max(known) - min(known)) / speeds[mid]
                     if known and speeds[mid] else None)
    truth = median.get("_outputs")
    # Greedy: repetitions should emit the same tokens; a difference is recorded, not fatal.
    rep["num_differing_tokens"] = sum(
        truth is not None and num_differing(r.get("_outputs") or {}, truth) > 0 for r in runs)
    rep["num_failed"] = sum(bool(r.get("num_errors") or r.get("num_wrong_lengths"))
                            for r in runs)
    median["repeats"] = rep
    return median


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def num_differing(outputs: dict, truth: dict) -> int:
    """Requests whose output is not token-for-token `truth`'s (a missing one counts)."""
    return sum(rid not in outputs or rid not in truth or list(outputs[rid]) != list(truth[rid])
               for rid in set(outputs) | set(truth))


def fraction_on_truth(outputs: dict, truth: dict) -> float:
    """Share of the truth's tokens that an output reproduced before its first difference
    (summed over requests). A flip in the last tokens of a few requests leaves the speed-up
    meaningful; an early flip (acceptance collapses) does not. 1.0 when all are equal."""
    total = sum(len(t) for t in truth.values())
    if not total:
        return 1.0
    matched = 0
    for rid, want in truth.items():
        got = list(outputs.get(rid, ()))
        n = 0
        for a, b in zip(got, want):
            if a != b:
                break
            n += 1
        matched += n
    return matched / total


def profile_slices(system: str, workloads: dict) -> list[tuple]:
    """(result key, workload, requests, max_new, file) profiled after `system`'s workloads:
    W-RANDOM's mix of prefill and wide decode, then batch-1 decode (CUDA-graph replays), for
    the default and unfused engines; batch-1 decode alone for llmbatch-l2prefetch (its change
    shows in the qkv_proj and o_proj kernel times), llmbatch-pdl (its change shows as the
    GPU-busy fraction: kernels overlap their neighbours' launch tails) and
    llmbatch-skinny-gemv-pdl and llmbatch-gemv-prefetch (the gemv kernels' times inside the
    decode graph), llmbatch-rotary-attn and llmbatch-prev-defaults (the one-launch decode
    attention against the rotary + attention pair), llmbatch-no-pdl (kernel times without
    PDL's overlap: with it each kernel's time includes its wait on the previous one, stop 19's
    gemv read 18 us a call)."""
    full = system in ("llmbatch", "llmbatch-unfused")
    out = []
    if full and "W-RANDOM" in workloads:
        out.append((f"{system}_profile", "W-RANDOM", 64, 48, f"profile_{system}.txt"))
    batch1_only = ("llmbatch-l2prefetch", "llmbatch-pdl", "llmbatch-skinny-gemv-pdl",
                   "llmbatch-gemv-prefetch", "llmbatch-gemv-prefetch-l2", "llmbatch-rotary-attn",
                   "llmbatch-prev-defaults", "llmbatch-no-pdl")
    if (full or system in batch1_only) and "W-BATCH1" in workloads:
        out.append((f"{system}_profile_batch1", "W-BATCH1", 1, 128,
                    f"profile_{system}_batch1.txt"))
    return out


def profile_steps(engine, workload: Workload, out_path: str, num_requests: int = 64,
                  max_new: int = 48) -> dict:
    """A slice of `workload` under torch.profiler: the top kernels and host ops go to
    `out_path` (text), and the returned dict says how busy the GPU was (kernel time / wall).

    For the next tuning session, not a figure: the profiler itself slows the host side.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.workloads import BenchRequest

    reqs = [BenchRequest(r.prompt_token_ids, min(max_new, r.max_new_tokens))
            for r in workload.requests[:num_requests]]
    engine_reqs = _requests(reqs, f"profile-{workload.name}-")
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in engine.generate(engine_reqs):
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    with open(out_path, "w") as f:
        f.write(f"{len(reqs)} requests of {workload.name}, max_new {max_new}; wall {wall:.3f} s "
                f"under the profiler\n")
        # Device time first, under whichever name this torch knows (newer: "device", older:
        # "cuda"; recent versions accept both, which printed the same table twice), then host.
        for keys in (("self_device_time_total", "self_cuda_time_total"), ("self_cpu_time_total",)):
            errors = []
            for key in keys:
                try:
                    table = events.table(sort_by=key, row_limit=30, max_name_column_width=70)
                except Exception as exc:
                    errors.append(f"{key}: {exc}")
                    continue
                f.write(f"\n== sorted by {key}\n{table}\n")
                break
            else:
                f.write(f"\n(not available: {'; '.join(errors)})\n")
    # Busy time: the device-side rows only (kernels, memcpys). An op row such as aten::mm also
    # carries the time of the kernels it launched, so summing every row counted them twice
    # (stop 9's H200 W-RANDOM profile said "busy 1.10 of the wall time").
    kernel_us = 0.0
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        kernel_us += dev or 0.0
    return {"wall_s": wall, "gpu_kernel_s": kernel_us / 1e6,
            "gpu_busy_fraction": (kernel_us / 1e6) / wall if wall > 0 else None,
            "num_requests": len(reqs), "max_new": max_new, "table": out_path}
