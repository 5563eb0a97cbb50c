"""bench/: exact workload totals (BENCH.md), floor arithmetic on a hand-computed case, the table,
and the CPU dry run of bench/gpu_check.sh (skipped while the engine cannot be imported)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from bench import floor as floor_mod
from bench import report
from bench.floor import Ceilings, count_unique_prefill, workload_floor
from bench.llmbatch_runner import engine_unavailable_reason
from bench.model_shapes import SHAPE_1B, ModelShape, get_shape
from bench.workloads import build, ideal_tokens_per_step, w_prefix, w_random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128256


# -- workloads ---------------------------------------------------------------------------
def test_w_random_totals_match_bench_md():
    w = w_random(VOCAB)
    assert len(w.requests) == 256
    assert w.num_prompt_tokens == 154_607
    assert w.num_output_tokens == 74_250


def test_w_random_follows_the_literal_loop_of_bench_md():
    rng = random.Random(0)
    expected = []
    for _ in range(256):
        il, ol = rng.randint(128, 1024), rng.randint(64, 512)
        prompt = [rng.randrange(100, VOCAB) for _ in range(il)]
        expected.append((prompt, ol))
    got = [(r.prompt_token_ids, r.max_new_tokens) for r in w_random(VOCAB).requests]
    assert got == expected


def test_w_prefix_totals_and_groups():
    w = w_prefix(VOCAB)
    assert len(w.requests) == 256
    assert w.num_prompt_tokens == 282_325
    assert w.num_output_tokens == 32_768
    prefixes = [r.prompt_token_ids[:1024] for r in w.requests]
    assert all(prefixes[i] == prefixes[i % 8] for i in range(256))
    assert len({tuple(p) for p in prefixes}) == 8
    assert all(32 <= len(r.prompt_token_ids) - 1024 <= 128 for r in w.requests)


def test_batch1_and_spec_shapes():
    b1 = build("W-BATCH1", VOCAB)
    assert [(len(r.prompt_token_ids), r.max_new_tokens) for r in b1.requests] == [(512, 512)]
    spec = build("W-SPEC", VOCAB)
    assert len(spec.requests) == 64 and spec.num_prompt_tokens == 64 * 512
    assert spec.num_output_tokens == 64 * 256
    assert spec.params == {"batch_sizes": [1, 8, 64], "alphas": [0.6, 0.8, 0.95], "k": 4}
    assert ideal_tokens_per_step(0.8, 4) == pytest.approx(3.3616)


def test_scaled_workload_keeps_prefix_groups_and_token_range():
    w = w_prefix(1024, scale=0.05)
    assert len(w.requests) == 13                      # round(256 * 0.05)
    assert all(r.prompt_token_ids[:51] == w.requests[i % 8].prompt_token_ids[:51]
               for i, r in enumerate(w.requests))
    assert all(100 <= t < 1024 for r in w.requests for t in r.prompt_token_ids)
    assert all(r.max_new_tokens == 6 for r in w.requests)   # round(128 * 0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="W-RANDOM", vocab=100), "vocab must be > 100"),
    (dict(name="W-RANDOM", vocab=1024, scale=0.0), "scale must be in (0, 1]"),
    (dict(name="W-NOPE", vocab=1024), "unknown workload 'W-NOPE'"),
])
def test_bad_workload_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        build(**kwargs)
    assert message in str(err.value)


# -- model shapes ------------------------------------------------------------------------
def test_1b_shape_counts():
    assert SHAPE_1B.num_params == 1_235_814_400
    assert SHAPE_1B.num_non_embedding_params == 1_235_814_400 - 128256 * 2048
    assert SHAPE_1B.kv_bytes_per_token(2) == 32 * 1024
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        get_shape("huge")


# -- floor -------------------------------------------------------------------------------
# hidden 4, inter 8, 1 layer, 2 heads (head_dim 2), 1 KV head, vocab 10, tied:
# attention 4*4*2 (q, o) + 4*2*2 (k, v) = 48; MLP 3*4*8 = 96; norms 2*4 = 8; per layer 152;
# embedding 40; final norm 4 => 196 params, 156 non-embedding. KV (2 bytes) 1*2*1*2*2 = 8 B/token.
TOY = ModelShape("toy", hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=10, rope_theta=1e4,
                 max_position_embeddings=64)


def test_toy_shape_counts():
    assert (TOY.num_params, TOY.num_non_embedding_params, TOY.kv_bytes_per_token(2)) == \
        (196, 156, 8)


def test_trie_counts_shared_tokens_once():
    # nodes 1, 2, 3, 4 at depths 0, 1, 2, 2 -> contexts 1 + 2 + 3 + 3
    assert count_unique_prefill([[1, 2, 3], [1, 2, 4]]) == (4, 9)
    assert count_unique_prefill([[5], [5], [6]]) == (2, 2)


def test_floor_hand_computed_bandwidth_bound():
    ceil = Ceilings("toy", "bfloat16", bandwidth_bytes_per_s=100.0, flops_per_s=1000.0)
    f = workload_floor([3, 3], [2, 1], TOY, 2, ceil, prompts=[[1, 2, 3], [1, 2, 4]])
    # attention per (query, key) pair: 4 * 1 layer * 2 heads * 2 head_dim = 16 FLOPs
    # prefill: 4 distinct tokens, 9 pairs; FLOPs 2*156*4 + 16*9 = 1392; bytes 196*2 + 8*4 = 424
    assert (f["prefill_tokens"], f["prefill_flops"], f["prefill_bytes"]) == (4, 1392, 424)
    assert f["prefill_s"] == pytest.approx(4.24)
    # step 0: both requests, contexts 3 + 3: FLOPs 2*196*2 + 16*6 = 880, bytes 392 + 48 = 440
    # step 1: request 0 only, context 3 + 1: FLOPs 392 + 64 = 456, bytes 392 + 32 = 424
    assert (f["decode_steps"], f["decode_flops"], f["decode_bytes"]) == (2, 1336, 864)
    assert f["decode_s"] == pytest.approx(4.40 + 4.24)
    assert f["total_s"] == pytest.approx(12.88)
    assert f["out_tok_per_s"] == pytest.approx(3 / 12.88)
    assert f["tpot_s"] == pytest.approx(4.24)


def test_floor_hand_computed_compute_bound_without_sharing():
    ceil = Ceilings("toy", "bfloat16", bandwidth_bytes_per_s=1e9, flops_per_s=1.0)
    f = workload_floor([3, 3], [2, 1], TOY, 2, ceil)          # no prompts: no sharing
    # prefill: 6 tokens, pairs 6 + 6 = 12: FLOPs 2*156*6 + 16*12 = 2064
    assert (f["prefill_tokens"], f["prefill_flops"]) == (6, 2064)
    assert f["total_s"] == pytest.approx(2064 + 880 + 456)


def test_floor_1b_w_random_matches_bench_md():
    """BENCH.md: on the H200's ceilings W-RANDOM is prefill 0.37 s + decode 0.73 s -> ~67k."""
    w = w_random(VOCAB)
    ceil = Ceilings("H200", "bfloat16", 4.28e12, 806e12)
    f = workload_floor([len(r.prompt_token_ids) for r in w.requests],
                       [r.max_new_tokens for r in w.requests], SHAPE_1B, 2, ceil,
                       prompts=[r.prompt_token_ids for r in w.requests])
    assert abs(f["prefill_s"] - 0.37) < 0.015       # 0.382: we also count attention FLOPs
    assert abs(f["decode_s"] - 0.73) < 0.01
    assert 66_000 < f["out_tok_per_s"] < 68_000
    assert f["decode_steps"] == max(r.max_new_tokens for r in w.requests) == 511


def test_floor_rejects_bad_input():
    ceil = Ceilings("toy", "bfloat16", 1.0, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        workload_floor([3], [1, 2], TOY, 2, ceil)
    with pytest.raises(ValueError, match="measured time must be > 0"):
        floor_mod.fraction_of_floor(1.0, 0.0)


# -- table -------------------------------------------------------------------------------
def test_table_ratios_and_fractions():
    results = {
        "workloads": {"W-RANDOM": {"floor": {"out_tok_per_s": 10_000.0}},
                      "W-BATCH1": {"floor": {"out_tok_per_s": 1.0, "tpot_s": 0.001}}},
        "runs": {
            "W-RANDOM": {"llmbatch": {"out_tok_per_s": 3000.0, "prefix_hit_rate": 0.25,
                                      "weight_bytes": 2_471_000_000},
                         "llmbatch-nf4": {"out_tok_per_s": 1500.0, "prefix_hit_rate": 0.25,
                                          "weight_bytes": 1_000_000_000},
                         "hf-static": {"out_tok_per_s": 1000.0},
                         "hf-cb": {"error": "RuntimeError: boom"}},
            "W-BATCH1": {"llmbatch": {"out_tok_per_s": 500.0, "tpot_s": 0.002},
                         "hf-generate": {"out_tok_per_s": 20.0, "tpot_s": 0.05}},
        },
    }
    rows = report.table_rows(results)
    assert rows[0]["ratios"] == {"hf-static": 3.0}
    assert rows[0]["fraction_of_floor"] == pytest.approx(0.3)
    # A quantized run: against the peers and against the unquantized llmbatch run.
    assert rows[1]["ratios"] == {"hf-static": 1.5, "llmbatch": 0.5}
    assert rows[3]["note"] == "error: RuntimeError: boom"
    assert rows[4]["ratios"] == {"hf-generate": pytest.approx(25.0)}
    assert rows[4]["fraction_of_floor"] == pytest.approx(0.5)
    text = report.format_table(rows).splitlines()
    assert text[0] == " | ".join(report.HEADER)
    assert text[2] == "W-RANDOM | llmbatch | 3,000 | 3.00x hf-static | 0.300 | 25.0% | 2,471.0"
    assert text[3] == ("W-RANDOM | llmbatch-nf4 | 1,500 | 1.50x hf-static, 0.50x llmbatch | "
                       "0.150 | 25.0% | 1,000.0")
    assert text[5] == "W-RANDOM | hf-cb | error: RuntimeError: boom | | | |"
    assert text[6] == ("W-BATCH1 | llmbatch | 500.0 (TPOT 2.00 ms) | 25.00x hf-generate | "
                       "0.500 | — | —")


def test_run_rejects_bad_flags():
    from bench.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--workloads", "W-RANDOM,W-BOGUS"])
    with pytest.raises(SystemExit):
        parse_args(["--scale", "2"])
    assert parse_args(["--workloads", "W-SPEC,W-PREFIX"]).workload_names == \
        ["W-PREFIX", "W-SPEC"]
    assert parse_args([]).quant_names == ["bf16"]
    assert parse_args(["--quantization", "bf16,nf4,int8"]).quant_names == ["bf16", "nf4", "int8"]
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "bf16,fp8"])


# -- replay proposer and the llmbatch side, on a fake engine (no torch) -------------------------
def test_replay_proposer_corrupts_at_rate_and_never_keeps_a_corrupted_true_token():
    from bench.spec_replay import ReplayProposer

    cont = {"a": [100 + (i % 50) for i in range(10_000)]}
    p = ReplayProposer(cont, alpha=0.8, vocab_size=160)
    kept = [p.token_at("a", i) == cont["a"][i] for i in range(10_000)]
    assert 0.78 < sum(kept) / len(kept) < 0.82
    assert all(100 <= p.token_at("a", i) < 160 for i in range(1000))
    assert [p.token_at("a", i) for i in range(50)] == [p.token_at("a", i) for i in range(50)]
    assert ReplayProposer(cont, 1.0, 160).token_at("a", 7) == 107
    assert all(ReplayProposer(cont, 0.0, 160).token_at("a", i) != cont["a"][i]
               for i in range(1000))


def test_replay_proposer_proposes_after_current_output():
    from types import SimpleNamespace

    from bench.spec_replay import ReplayProposer

    p = ReplayProposer({"r": [101, 102, 103, 104, 105]}, alpha=1.0, vocab_size=200)
    assert p.propose(SimpleNamespace(request_id="r", output_token_ids=[101, 102]), 4) == \
        [103, 104, 105]
    assert p.propose(SimpleNamespace(request_id="x", output_token_ids=[]), 4) == []
    with pytest.raises(ValueError, match="alpha must be in"):
        ReplayProposer({}, alpha=1.5, vocab_size=200)


class _FakeEngine:
    """Outputs token (100 + prompt[0] + j) % 1000 at index j; one step per output token
    of the longest request, halved when a proposer is set.

    verify_flip: with a proposer set, tokens from index 3 on are one higher (as bf16 verify
    numerics flip an argmax); batch_dependent: tokens also shift by the batch size (request
    ids repeat across batch sizes, so each size needs its own truth). Records every installed
    proposer's (alpha, continuations) per generate call."""

    def __init__(self, with_hook: bool, verify_flip: bool = False,
                 batch_dependent: bool = False) -> None:
        self.steps = 0
        self.proposer = None
        self.verify_flip, self.batch_dependent = verify_flip, batch_dependent
        self.replayed = []
        if with_hook:
            self.set_proposer = lambda p: setattr(self, "proposer", p)

    def stats(self) -> dict:
        return {"num_steps": self.steps, "prefix_hit_rate": 0.5}

    def generate(self, requests):
        from llmbatch.runtime.outputs import GenerationResult

        longest = max(r.sampling_params.max_new_tokens for r in requests)
        self.steps += longest // 2 if self.proposer else longest
        if self.proposer:
            self.replayed.append((len(requests), self.proposer.alpha,
                                  dict(self.proposer.continuations)))
        shift = len(requests) if self.batch_dependent else 0
        for r in requests:
            n = r.sampling_params.max_new_tokens
            toks = [(100 + r.prompt_token_ids[0] + j + shift
                     + (1 if self.proposer and self.verify_flip and j >= 3 else 0)) % 1000
                    for j in range(n)]
            yield GenerationResult(r.request_id, toks, "", "length", len(r.prompt_token_ids),
                                   2, n, 0.1, 0.01, 1.0)


def test_run_spec_on_a_fake_engine():
    from bench.llmbatch_runner import run_spec

    w = build("W-SPEC", 1024, scale=0.05)                  # 64 requests of 26 + 13 tokens
    res = run_spec(_FakeEngine(with_hook=False), w, 1024)
    assert res["replay"].startswith("not available")
    assert [(b, r["output_tokens"], r["num_cached_prompt_tokens"])
            for b, r in res["batches"].items()] == [("1", 13, 2), ("8", 104, 16), ("64", 832, 128)]
    assert res["batches"]["8"]["tokens_per_step_per_request"] == pytest.approx(1.0)
    res = run_spec(_FakeEngine(with_hook=True), w, 1024)
    assert res["replay"] == "measured"
    assert len(res["replay_runs"]) == 9
    run = res["replay_runs"]["alpha=0.8,b=64"]
    assert run["greedy_equal_to_spec_off"] is True
    assert run["tokens_per_step_per_request"] == pytest.approx(13 / 6)
    assert run["num_wrong_lengths"] == 0
    # Calibration (float32-like fake: verify numerics equal decode numerics): equals spec-off.
    assert list(res["calibration"]) == ["1", "8", "64"]
    cal = res["calibration"]["8"]
    assert cal["greedy_equal_to_spec_off"] is True and cal["num_differing_from_spec_off"] == 0
    assert cal["tokens_per_step_per_request"] == pytest.approx(13 / 6)
    assert cal["output_tokens"] == 104 and cal["out_tok_per_s"] > 0
    assert run["greedy_equal_to_calibration"] is True
    assert run["num_differing_from_calibration"] == 0


def test_run_spec_replays_the_calibrated_truth_per_batch_size():
    """Verify numerics flip tokens (as bf16 on the GPU): alpha runs replay the calibration
    outputs of their own batch size, equal it, and differ from spec-off without being lossy."""
    from bench.llmbatch_runner import run_spec

    w = build("W-SPEC", 1024, scale=0.05)
    eng = _FakeEngine(with_hook=True, verify_flip=True, batch_dependent=True)
    res = run_spec(eng, w, 1024)
    assert eng.proposer is None                               # hook cleared at the end
    assert [(b, a) for b, a, _ in eng.replayed[:3]] == [(1, 1.0), (8, 1.0), (64, 1.0)]
    assert len(eng.replayed) == 3 + 9
    first = lambda b: (100 + w.requests[0].prompt_token_ids[0] + b) % 1000  # noqa: E731
    # Calibration proposes the spec-off continuation of its own batch size ...
    b, _, cont = eng.replayed[1]
    assert cont["W-SPEC-0"][:5] == [first(8) + j for j in range(5)]
    # ... and every alpha run proposes the calibrated (flipped) output of its batch size.
    for b, alpha, cont in eng.replayed[3:]:
        assert alpha in (0.6, 0.8, 0.95) and len(cont) == b
        assert cont["W-SPEC-0"][:5] == [first(b), first(b) + 1, first(b) + 2,
                                        first(b) + 4, first(b) + 5]
    cal = res["calibration"]["64"]
    assert cal["greedy_equal_to_spec_off"] is False
    assert cal["num_differing_from_spec_off"] == 64
    run = res["replay_runs"]["alpha=0.95,b=1"]
    assert run["greedy_equal_to_spec_off"] is False
    assert run["greedy_equal_to_calibration"] is True
    assert run["speedup_vs_off"] > 0


def test_spec_rows_say_differs_only_against_calibration():
    spec = {"k": 4, "replay": "measured", "ideal_tokens_per_step": {"0.8": 3.36},
            "batches": {"1": {"out_tok_per_s": 100.0}},
            "replay_runs": {
                "alpha=0.8,b=1": {"out_tok_per_s": 250.0, "speedup_vs_off": 2.5,
                                  "greedy_equal_to_spec_off": True,
                                  "greedy_equal_to_calibration": True},
                "alpha=0.6,b=1": {"out_tok_per_s": 200.0, "speedup_vs_off": 2.0,
                                  "greedy_equal_to_spec_off": False,
                                  "greedy_equal_to_calibration": True},
                "alpha=0.95,b=1": {"out_tok_per_s": 300.0, "speedup_vs_off": 3.0,
                                   "greedy_equal_to_spec_off": True,
                                   "greedy_equal_to_calibration": False},
                "old": {"out_tok_per_s": 90.0, "speedup_vs_off": 0.9,   # no calibration yet
                        "greedy_equal_to_spec_off": False}}}
    results = {"workloads": {"W-SPEC": {}}, "runs": {"W-SPEC": {"llmbatch": spec}}}
    text = report.format_table(report.table_rows(results)).splitlines()
    assert text[2] == "W-SPEC b=1 | llmbatch spec-off | 100 | — | — | — | —"
    assert text[3:] == [
        "W-SPEC alpha=0.8,b=1 | llmbatch replay k=4 | 250 | 2.50x spec-off | — | — | —",
        "W-SPEC alpha=0.6,b=1 | llmbatch replay k=4 | 200 | "
        "2.00x spec-off (≠ spec-off in bf16) | — | — | —",
        "W-SPEC alpha=0.95,b=1 | llmbatch replay k=4 | 300 | "
        "3.00x spec-off (greedy output DIFFERS) | — | — | —",
        "W-SPEC old | llmbatch replay k=4 | 90 | 0.90x spec-off (greedy output DIFFERS) | "
        "— | — | —"]


# -- the one-call GPU script, dry run on the CPU -------------------------------------------
@pytest.mark.timeout(300)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    reason = engine_unavailable_reason()
    if reason is not None:
        pytest.skip(f"llmbatch.runtime.engine does not import yet ({reason})")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, BENCH_MODEL_DIR=str(tmp_path / "model"),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=290)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines.count(" | ".join(report.HEADER)) == 1
    table = lines[lines.index(" | ".join(report.HEADER)):]
    assert table[-1].startswith("W-SPEC")                # the table is printed last
    systems = {(r.split(" | ")[0], r.split(" | ")[1]) for r in table[2:]}
    for pair in [("W-RANDOM", "llmbatch"), ("W-RANDOM", "hf-static"), ("W-RANDOM", "hf-cb"),
                 ("W-PREFIX", "llmbatch"), ("W-PREFIX", "hf-cb"), ("W-BATCH1", "llmbatch"),
                 ("W-BATCH1", "hf-generate")]:
        assert pair in systems
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["smoke_test_only"] is True
    for name in ("W-RANDOM", "W-PREFIX", "W-BATCH1"):
        run = results["runs"][name]["llmbatch"]
        assert run["output_tokens"] == results["workloads"][name]["num_output_tokens"]
        assert run["num_errors"] == 0 and run["num_wrong_lengths"] == 0
    # W-PREFIX scaled: 8 groups share a 51-token prefix (3 full blocks of 16) -> hits > 0
    assert results["runs"]["W-PREFIX"]["llmbatch"]["num_cached_prompt_tokens"] > 0
    # The profiled slice ran and wrote its kernel table; step phases are timed.
    assert "error" not in results["llmbatch_profile"], results["llmbatch_profile"]
    assert (out / "profile_llmbatch.txt").read_text().count("== sorted by") == 3
    delta = results["runs"]["W-RANDOM"]["llmbatch"]["engine_stats_delta"]
    assert delta["execute_s"] > 0 and delta["schedule_s"] > 0


@pytest.mark.timeout(300)
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """The real Triton compiler (not the interpreter the CPU tests use) accepts a sample of the
    launched specialisations, down to a cubin from ptxas; bench/compile_kernels.py has all."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    sample = ("paged_attention bf16 hd64 g8 bq2 bm16 bs16 splits8,"
              "paged_attention fp32 hd128 g1 bq64 bm64 bs32 splits1,"
              "reduce_splits bf16 splits16,store_kv bf16 slots i32,rms_norm bf16 residual=True,"
              "silu_and_mul bf16,rotary bf16 q32 k8")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--filter", sample],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    if proc.returncode != 0 and "backend" in proc.stderr.lower() and "nvidia" in proc.stderr:
        pytest.skip(f"triton has no NVIDIA backend here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    import re

    done = re.search(r"(\d+)/(\d+) variants compiled for sm_90", proc.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 7, proc.stdout


def test_quantized_runs_on_cpu_report_weights_beside_bf16(tmp_path):
    """--quantization bf16,nf4,int8: W-RANDOM and W-BATCH1 once per method (W-PREFIX only
    unquantized), each with the loaded weight bytes; the quantized ones are smaller."""
    reason = engine_unavailable_reason()
    if reason is not None:
        pytest.skip(f"llmbatch.runtime.engine does not import yet ({reason})")
    pytest.importorskip("bitsandbytes")
    import json

    from bench.run import main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--device", "cpu", "--scale", "0.05", "--skip-peers",
               "--workloads", "W-RANDOM,W-PREFIX,W-BATCH1", "--quantization", "bf16,nf4,int8",
               "--out", str(out), "--model-dir", str(tmp_path / "model")])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]["W-PREFIX"]) == ["llmbatch"]
    for name in ("W-RANDOM", "W-BATCH1"):
        runs = results["runs"][name]
        assert list(runs) == ["llmbatch", "llmbatch-nf4", "llmbatch-int8"]
        expected = results["workloads"][name]["num_output_tokens"]
        for system, quant in (("llmbatch", "none"), ("llmbatch-nf4", "nf4"),
                              ("llmbatch-int8", "int8")):
            run = runs[system]
            assert (run["quantization"], run["output_tokens"], run["num_errors"]) == \
                (quant, expected, 0)
            assert run["weight_bytes"] == sum(run["weight_bytes_per_rank"]) > 0
        assert runs["llmbatch-nf4"]["weight_bytes"] < runs["llmbatch-int8"]["weight_bytes"] \
            < runs["llmbatch"]["weight_bytes"]
    rows = [r for r in results["table"] if r["workload"] == "W-RANDOM"]
    assert [r["system"] for r in rows] == ["llmbatch", "llmbatch-nf4", "llmbatch-int8"]
    assert set(rows[1]["ratios"]) == {"llmbatch"}
