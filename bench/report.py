"""Turns the results dict of bench/run.py into table rows and one short printed table."""

from __future__ import annotations

from typing import Optional

HEADER = ("workload", "system", "out tok/s", "ratio vs peers", "fraction of floor",
          "prefix-hit rate", "weights MB")
PEERS = {"W-RANDOM": ("hf-static", "hf-cb"), "W-PREFIX": ("hf-cb",), "W-BATCH1": ("hf-generate",)}


def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _fraction(run: dict, floor: dict, batch1: bool) -> Optional[float]:
    if batch1:
        if run.get("tpot_s") and floor.get("tpot_s"):
            return floor["tpot_s"] / run["tpot_s"]
        return None
    if run.get("out_tok_per_s"):
        return run["out_tok_per_s"] / floor["out_tok_per_s"]
    return None


def table_rows(results: dict) -> list[dict]:
    """One row per (workload, system); skipped/failed systems get a row saying so."""
    rows = []
    for wname, runs in results["runs"].items():
        floor = results["workloads"][wname].get("floor", {})
        batch1 = wname == "W-BATCH1"
        if wname == "W-SPEC":
            rows.extend(_spec_rows(runs))
            continue
        for system, run in runs.items():
            row = {"workload": wname, "system": system}
            if "skipped" in run or "error" in run:
                row["note"] = run.get("skipped") or f"error: {run['error']}"
                rows.append(row)
                continue
            row["out_tok_per_s"] = run.get("out_tok_per_s")
            row["tpot_s"] = run.get("tpot_s") if batch1 else None
            row["ttft_s"] = run.get("ttft_s_mean") if batch1 else None
            row["fraction_of_floor"] = _fraction(run, floor, batch1)
            row["prefix_hit_rate"] = run.get("prefix_hit_rate")
            row.update(_repeat_spread(run, batch1))
            row["ratios"] = {}
            # llmbatch's loaded weights (all ranks); quantized systems (llmbatch-nf4, ...) are
            # also compared with the unquantized llmbatch run of the same workload.
            row["weight_bytes"] = run.get("weight_bytes")
            if system.startswith("llmbatch"):
                compare = PEERS.get(wname, ()) + (("llmbatch",) if system != "llmbatch" else ())
                for peer in compare:
                    p = runs.get(peer, {})
                    if batch1 and p.get("tpot_s") and run.get("tpot_s"):
                        row["ratios"][peer] = p["tpot_s"] / run["tpot_s"]
                    elif not batch1 and p.get("out_tok_per_s") and run.get("out_tok_per_s"):
                        row["ratios"][peer] = run["out_tok_per_s"] / p["out_tok_per_s"]
                agree = run.get("agreement_with_llmbatch")
                if agree is not None and "llmbatch" in row["ratios"]:
                    # "1.20x llmbatch (98% same tokens)": the speed and whether it is the same work.
                    # 100% only when identical: 0.996 would round up and hide a difference.
                    shown = agree if agree >= 1 else min(agree, 0.99)
                    label = f"llmbatch ({shown:.0%} same tokens)"
                    row["ratios"][label] = row["ratios"].pop("llmbatch")
            rows.append(row)
    return rows


def _repeat_spread(run: dict, batch1: bool) -> dict:
    """{"num_runs", "spread"} of a repeated llmbatch run (bench.run --repeats), {} for one run:
    spread is the largest distance of any run from the reported (median) run, relative to it,
    in TPOT for W-BATCH1 (its figure) and out tok/s otherwise, so "±3.0%" says every
    repetition lies within 3 % of the figure shown."""
    rep = run.get("repeats") or {}
    key = "tpot_s" if batch1 and run.get("tpot_s") else "out_tok_per_s"
    values = [v for v in rep.get(key) or () if v is not None]
    if rep.get("n", 1) < 2 or not values or not run.get(key):
        return {}
    figure = run[key]
    return {"num_runs": rep["n"],
            "spread": max(abs(v - figure) for v in values) / figure}


def _spec_rows(runs: dict) -> list[dict]:
    """llmbatch's W-SPEC rows, then each A/B variant's (llmbatch-skinny-spec, bench/variants.py
    Variant.workloads), the variant's against llmbatch's row of the same key."""
    base = runs.get("llmbatch", {})
    rows = _spec_system_rows("llmbatch", base, None)
    for system, spec in runs.items():
        if system != "llmbatch" and system.startswith("llmbatch"):
            rows.extend(_spec_system_rows(system, spec, base))
    return rows


def _spec_system_rows(system: str, spec: dict, base: Optional[dict]) -> list[dict]:
    """One system's W-SPEC rows; base: llmbatch's results, compared with (None: none)."""
    rows = []
    if "batches" not in spec:
        note = spec.get("skipped") or (f"error: {spec['error']}" if "error" in spec
                                       else "not run")
        return [{"workload": "W-SPEC", "system": system, "note": note}]

    def vs_base(section: str, key: str, run: dict) -> dict:
        other = (base or {}).get(section, {}).get(key, {})
        if other.get("out_tok_per_s") and run.get("out_tok_per_s"):
            return {"llmbatch": run["out_tok_per_s"] / other["out_tok_per_s"]}
        return {}

    for b, run in spec["batches"].items():
        rows.append({"workload": f"W-SPEC b={b}", "system": f"{system} spec-off",
                     "out_tok_per_s": run.get("out_tok_per_s"),
                     "ratios": vs_base("batches", b, run),
                     "fraction_of_floor": None, "prefix_hit_rate": None})
    ideal = ", ".join(f"α={a}: {v:.2f}" for a, v in spec["ideal_tokens_per_step"].items())
    if spec.get("replay") != "measured":
        rows.append({"workload": "W-SPEC replay", "system": system,
                     "note": f"{spec.get('replay')} (ideal tok/step {ideal})"})
    for key, run in spec.get("replay_runs", {}).items():
        speedup = run.get("speedup_vs_off")
        why = _spec_equality_note(run)
        note = f" ({why})" if why else ""
        rows.append({"workload": f"W-SPEC {key}", "system": f"{system} replay k={spec['k']}",
                     "out_tok_per_s": run.get("out_tok_per_s"),
                     "ratios": ({"spec-off" + note: speedup} if speedup else {})
                     | vs_base("replay_runs", key, run),
                     "fraction_of_floor": None, "prefix_hit_rate": None})
    return rows


def _spec_equality_note(run: dict) -> str:
    """Whether the run emitted the truth it replayed (bench/spec_run.py: calibration, refined
    by rerunning on the run's own output); differing from spec-off alone is bf16 rounding.
    Results from before refinement compare with the calibration run, and from before
    calibration with spec-off."""
    if "greedy_equal_to_truth" in run:
        notes = []
        if not run["greedy_equal_to_truth"]:
            notes.append(f"greedy output DIFFERS, {run['fraction_on_truth']:.0%} of tokens "
                         f"on the truth")
        elif not run.get("greedy_equal_to_spec_off", True):
            notes.append("≠ spec-off in bf16")
        if run.get("truth_rounds", 1) > 1:
            notes.append(f"truth refined in {run['truth_rounds']} rounds")
        return ", ".join(notes)
    equal_off = run.get("greedy_equal_to_spec_off")
    equal_cal = run.get("greedy_equal_to_calibration")
    if equal_cal is None:
        return "" if equal_off else "greedy output DIFFERS"
    if not equal_cal:
        on_truth = run.get("fraction_on_calibration")
        if on_truth is not None:   # how much of the truth was replayed before the first flip
            return f"greedy output DIFFERS, {on_truth:.0%} of tokens on the truth"
        return "greedy output DIFFERS"
    return "" if equal_off else "≠ spec-off in bf16"


def format_table(rows: list[dict]) -> str:
    lines = [" | ".join(HEADER), " | ".join("---" for _ in HEADER)]
    for r in rows:
        if "note" in r:
            lines.append(f"{r['workload']} | {r['system']} | {r['note']} | | | |")
            continue
        # "38,178 (±3.0%, 3 runs)"; W-BATCH1: "1,048.5 (TPOT 0.92 ms, TTFT 10.2 ms, ±2.0%,
        # 3 runs)" (TTFT: the one prefill of the reported run, where the run recorded it).
        repeats = (f"±{r['spread']:.1%}, {r['num_runs']} runs" if r.get("num_runs") else "")
        if r.get("tpot_s") is not None:
            ttft = (f"TTFT {r['ttft_s'] * 1e3:.1f} ms" if r.get("ttft_s") is not None else "")
            detail = ", ".join(x for x in (f"TPOT {r['tpot_s'] * 1e3:.2f} ms", ttft, repeats)
                               if x)
            speed = f"{r['out_tok_per_s']:,.1f} ({detail})"
        else:
            speed = _fmt(r.get("out_tok_per_s"), ",.0f") + (f" ({repeats})" if repeats else "")
        ratios = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("ratios", {}).items()) or "—"
        hit = r.get("prefix_hit_rate")
        weights = r.get("weight_bytes")
        lines.append(" | ".join([r["workload"], r["system"], speed, ratios,
                                 _fmt(r.get("fraction_of_floor"), ".3f"),
                                 "—" if hit is None else f"{hit:.1%}",
                                 "—" if weights is None else f"{weights / 1e6:,.1f}"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m bench.report OUT/results.json`: the table of a (possibly partial) run."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS_JSON", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        results = json.load(f)
    print(format_table(table_rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
