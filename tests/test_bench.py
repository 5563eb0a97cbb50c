"""bench/: exact workload totals (BENCH.md), floor arithmetic on a hand-computed case, the table
and the command line. W-SPEC's side is in test_bench_spec.py, the end-to-end CPU runs (the
gpu_check dry run, the kernel compile check) in test_bench_runs.py."""

from __future__ import annotations

import random

import pytest

from bench import floor as floor_mod
from bench import report
from bench.floor import Ceilings, count_unique_prefill, workload_floor
from bench.model_shapes import SHAPE_1B, ModelShape, get_shape
from bench.workloads import build, ideal_tokens_per_step, w_prefix, w_random

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


def test_table_agreement_label_says_100_only_when_identical():
    def label(agree):
        results = {"workloads": {"W-RANDOM": {"floor": {"out_tok_per_s": 1000.0}}},
                   "runs": {"W-RANDOM": {"llmbatch": {"out_tok_per_s": 100.0},
                                         "llmbatch-nf4": {"out_tok_per_s": 50.0,
                                                          "agreement_with_llmbatch": agree}}}}
        return list(report.table_rows(results)[1]["ratios"])

    assert label(1.0) == ["llmbatch (100% same tokens)"]
    assert label(0.996) == ["llmbatch (99% same tokens)"]   # not identical: never "100%"
    assert label(0.5) == ["llmbatch (50% same tokens)"]


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
