"""CPU micro-benchmark of the engine's host work per decode step (not a test; no asserts).

    python -m bench.bench_host_step [--runs 5] [--seqs 64,256] [--json OUT]

Why: at large batch the host part of a step (schedule, build step inputs, block tables,
sampling bookkeeping, append tokens, stop checks, results) is on the critical path even under
async scheduling (bench/RESULTS.md, stop 13: a 256-sequence W-PREFIX step took 6.8 ms on the
H200). Here the model is one layer of hidden size 64 (vocab 1024) on the CPU, so the forward is
small, and the time outside it is measured on its own: the model's forward, compute_logits and
the sampler's greedy argmax (device work on a GPU) are wrapped and their time subtracted from
each `Engine.step` call (what stays: scheduling, step inputs, block tables, host-to-device
copies, the sampler's host side, appending tokens, stop checks, results).

Each run: N requests (random 32-token prompts, no shared prefixes, greedy, EOS ignored, 64
output tokens each) on a fresh engine with max_num_seqs = N. Only steady decode steps count:
the engine steps whose forward ran exactly N tokens and that returned no result (so no prefill
and no finishing step). Per run, the mean over those steps (and the median step, `host p50`,
less sensitive to other load); printed, the median over runs (and the spread of the means). Sync and async scheduling (forced on with EngineConfig(async_scheduling=True),
off by default on the CPU) are run alternately, so drift from other load on the machine hits
both alike. Checkpoint: /tmp/llmbatch-bench-model-host1l (made on first use).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from bench.model_shapes import ModelShape, make_checkpoint

MODEL_DIR = "/tmp/llmbatch-bench-model-host1l"
# One layer, hidden 64: the forward is ~0.1-0.3 ms at 256 tokens on a CPU core.
SHAPE_HOST = ModelShape("host1l", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                        rope_theta=500000.0, max_position_embeddings=4096)
PROMPT_LEN = 32
OUTPUT_LEN = 64


def _requests(n: int, seed: int):
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams

    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(4, SHAPE_HOST.vocab_size) for _ in range(PROMPT_LEN)],
                    SamplingParams(max_new_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True))
            for i in range(n)]


def _instrument(engine) -> list[tuple[float, float, int, int]]:
    """Wrap engine.step and the device work (the model's forward, compute_logits, the greedy
    argmax); returns the list that collects, per step: (step seconds, device-work seconds,
    forward tokens, results returned). Input building, host-to-device copies and the sampler's
    host lists stay in the host time."""
    from llmbatch.runtime import sampler

    model = engine.runner.model
    inner_argmax = sampler.greedy_argmax   # put back by run_once
    records: list[tuple[float, float, int, int]] = []
    fwd = {"s": 0.0, "tokens": 0}
    inner_forward, inner_logits, inner_step = model.forward, model.compute_logits, engine.step

    def timed(fn, count_tokens):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                fwd["s"] += time.perf_counter() - t0
                if count_tokens:
                    fwd["tokens"] = len(args[0])   # input_ids: (num_tokens,)
        return wrapper

    def step():
        fwd["s"], fwd["tokens"] = 0.0, 0
        t0 = time.perf_counter()
        results = inner_step()
        records.append((time.perf_counter() - t0, fwd["s"], fwd["tokens"], len(results)))
        return results

    model.forward = timed(inner_forward, True)
    model.compute_logits = timed(inner_logits, False)
    # The greedy argmax is device work too (~0.2 ms over 256 x 1024 logits on a CPU core, one
    # kernel on a GPU); the sampler calls it through its module global.
    sampler.greedy_argmax = timed(inner_argmax, False)
    engine.step = step
    return records


def run_once(num_seqs: int, async_scheduling: bool, seed: int) -> dict:
    from bench.llmbatch_runner import build_engine

    engine, _ = build_engine(MODEL_DIR, "float32", "cpu", max_num_seqs=num_seqs,
                             async_scheduling=async_scheduling, kv_cache_blocks=4096)
    # Warm-up (torch's first calls, allocator): a short batch of the same shape.
    for _ in engine.generate(_requests(min(num_seqs, 16), seed + 1000)):
        pass
    from llmbatch.runtime import sampler

    argmax = sampler.greedy_argmax
    try:
        records = _instrument(engine)
        for _ in engine.generate(_requests(num_seqs, seed)):
            pass
    finally:
        sampler.greedy_argmax = argmax
    decode = [(t, f) for t, f, tokens, n_results in records
              if tokens == num_seqs and n_results == 0]
    engine.shutdown()
    if not decode:
        raise RuntimeError(f"no steady decode step at {num_seqs} sequences")
    step_ms = 1e3 * sum(t for t, _ in decode) / len(decode)
    host_ms = 1e3 * sum(t - f for t, f in decode) / len(decode)
    # The median step as well: robust to a stray GC pause or another process on the host.
    host_p50_ms = 1e3 * statistics.median(t - f for t, f in decode)
    return {"step_ms": step_ms, "host_ms": host_ms, "host_p50_ms": host_p50_ms,
            "num_steps": len(decode)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per setting (median reported)")
    ap.add_argument("--seqs", default="64,256", help="comma-separated sequence counts")
    ap.add_argument("--modes", default="sync,async", help="sync, async or both")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the numbers here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)   # the forward is tiny; threads only add noise on a shared host
    make_checkpoint(SHAPE_HOST, MODEL_DIR, dtype="float32", device="cpu")
    seqs = [int(x) for x in args.seqs.split(",")]
    modes = args.modes.split(",")
    runs: dict[tuple[int, str], list[dict]] = {(n, m): [] for n in seqs for m in modes}
    for r in range(args.runs):          # alternate settings within each round
        for n in seqs:
            for m in modes:
                runs[(n, m)].append(run_once(n, m == "async", seed=r))
    rows = []
    print(f"{'seqs':>5} {'mode':>6} {'step ms':>8} {'host ms':>8} {'host min-max':>14} "
          f"{'host p50':>8} steps")
    for (n, m), rs in runs.items():
        host = [x["host_ms"] for x in rs]
        row = {"num_seqs": n, "mode": m,
               "step_ms": statistics.median(x["step_ms"] for x in rs),
               "host_ms": statistics.median(host), "host_ms_min": min(host),
               "host_p50_ms": statistics.median(x["host_p50_ms"] for x in rs),
               "host_ms_max": max(host), "num_steps": rs[0]["num_steps"], "runs": rs}
        rows.append(row)
        print(f"{n:>5} {m:>6} {row['step_ms']:>8.3f} {row['host_ms']:>8.3f} "
              f"{min(host):>6.3f}-{max(host):<7.3f} {row['host_p50_ms']:>8.3f} "
              f"{row['num_steps']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
