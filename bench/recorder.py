"""What every row of bench.run shares, llmbatch's and the peers': the log line, the Recorder
that rewrites OUT/results.json after every figure (so a run cut short keeps what it measured),
attempt (one measurement; a failure is recorded with its message and the bench goes on) and
free_cuda (each system frees its model before the next one loads).

bench/run.py drives the run (CLI, peers, table); bench/llmbatch_rows.py runs llmbatch's engines.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from bench import llmbatch_runner


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def attempt(rec: Recorder, workload: str, system: str, fn) -> None:
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


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
