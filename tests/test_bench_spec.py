"""bench/'s W-SPEC side on a fake engine (no torch): the replay proposer, run_spec's spec-off,
calibration and alpha runs, and how the table reports them."""

from __future__ import annotations

import pytest

from bench import report
from bench.workloads import build

VOCAB = 128256

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
    # Drawn once at construction, the proposals are still token_at's, position by position.
    q = ReplayProposer({"r": list(range(101, 141))}, alpha=0.5, vocab_size=200)
    got = [q.propose(SimpleNamespace(request_id="r", output_token_ids=[0] * n), 4)
           for n in range(40)]
    assert got == [[q.token_at("r", i) for i in range(n, min(n + 4, 40))] for n in range(40)]
    assert 0 < sum(t != 101 + i for i, t in enumerate(q.proposals["r"])) < 40
    with pytest.raises(ValueError, match="alpha must be in"):
        ReplayProposer({}, alpha=1.5, vocab_size=200)


class _FakeEngine:
    """Outputs token (100 + prompt[0] + j) % 1000 at index j; one step per output token
    of the longest request, halved when a proposer is set.

    verify_flip: with a proposer set, tokens from index 3 on are one higher (as bf16 verify
    numerics flip an argmax); batch_dependent: tokens also shift by the batch size (request
    ids repeat across batch sizes, so each size needs its own truth). alpha_numerics, for a
    proposer with alpha < 1 (verify windows placed by corruptions, as in bf16): "fixed" keeps
    the first 5 tokens of the replayed truth and then emits its own tokens (one refinement
    round converges); "drifting" emits tokens that change with every call (never converges).
    Records every installed proposer's (alpha, continuations) per generate call."""

    def __init__(self, with_hook: bool, verify_flip: bool = False,
                 batch_dependent: bool = False, alpha_numerics: str = "") -> None:
        self.steps = 0
        self.calls = 0
        self.proposer = None
        self.verify_flip, self.batch_dependent = verify_flip, batch_dependent
        self.alpha_numerics = alpha_numerics
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
        self.calls += 1
        shift = len(requests) if self.batch_dependent else 0
        own = self.alpha_numerics and self.proposer and self.proposer.alpha < 1.0
        drift = self.calls if self.alpha_numerics == "drifting" else 0
        for r in requests:
            n = r.sampling_params.max_new_tokens
            toks = [(100 + r.prompt_token_ids[0] + j + shift
                     + (1 if self.proposer and self.verify_flip and j >= 3 else 0)) % 1000
                    for j in range(n)]
            if own:
                truth = self.proposer.continuations[r.request_id]
                toks = truth[:5] + [(t + 2 + drift) % 1000 for t in toks[5:]]
            yield GenerationResult(r.request_id, toks, "", "length", len(r.prompt_token_ids),
                                   2, n, 0.1, 0.01, 1.0)


def test_run_spec_on_a_fake_engine():
    from bench.spec_run import run_spec

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
    assert (run["truth_rounds"], run["greedy_equal_to_truth"], run["fraction_on_truth"]) == \
        (1, True, 1.0)


def test_run_spec_replays_the_calibrated_truth_per_batch_size():
    """Verify numerics flip tokens (as bf16 on the GPU): alpha runs replay the calibration
    outputs of their own batch size, equal it, and differ from spec-off without being lossy."""
    from bench.spec_run import run_spec

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
    assert run["greedy_equal_to_calibration"] is True and run["truth_rounds"] == 1
    assert run["speedup_vs_off"] > 0


@pytest.mark.parametrize("numerics", ("fixed", "drifting"))
def test_alpha_runs_replay_their_own_output_until_it_is_the_truth(numerics):
    """An alpha run whose output leaves the calibration (bf16 windows placed by corruptions)
    is rerun on its own output: "fixed" numerics converge in a second round, which replays
    the first round's output; "drifting" ones stop at MAX_TRUTH_ROUNDS and say how far the
    last round stayed on its truth."""
    from bench.spec_run import MAX_TRUTH_ROUNDS, run_spec

    w = build("W-SPEC", 1024, scale=0.05)                  # 13 output tokens a request
    eng = _FakeEngine(with_hook=True, alpha_numerics=numerics)
    res = run_spec(eng, w, 1024)
    rounds = 2 if numerics == "fixed" else MAX_TRUTH_ROUNDS
    assert len(eng.replayed) == 3 + 9 * rounds
    for key, run in res["replay_runs"].items():
        assert run["truth_rounds"] == rounds, key
        assert run["greedy_equal_to_calibration"] is False
        if numerics == "fixed":
            assert (run["greedy_equal_to_truth"], run["fraction_on_truth"]) == (True, 1.0)
        else:
            assert (run["greedy_equal_to_truth"], run["fraction_on_truth"]) == (False, 5 / 13)
    if numerics == "drifting":
        return
    # Round 2 of the first alpha run replays round 1's output: calibration's first 5 tokens,
    # then the run's own tokens.
    _, alpha, round2 = eng.replayed[4]
    cal = res["calibration"]["1"]   # (figures only; the fake's calibration = spec-off)
    assert alpha == 0.6 and cal["greedy_equal_to_spec_off"] is True
    base = [(100 + w.requests[0].prompt_token_ids[0] + j) % 1000 for j in range(13)]
    assert round2["W-SPEC-0"] == base[:5] + [(t + 2) % 1000 for t in base[5:]]


def test_spec_rows_report_the_refined_truth():
    spec = {"k": 4, "replay": "measured", "ideal_tokens_per_step": {"0.8": 3.36},
            "batches": {"1": {"out_tok_per_s": 100.0}},
            "replay_runs": {
                "alpha=0.8,b=1": {"out_tok_per_s": 250.0, "speedup_vs_off": 2.5,
                                  "greedy_equal_to_spec_off": True, "truth_rounds": 1,
                                  "greedy_equal_to_truth": True, "fraction_on_truth": 1.0},
                "alpha=0.6,b=1": {"out_tok_per_s": 200.0, "speedup_vs_off": 2.0,
                                  "greedy_equal_to_spec_off": False, "truth_rounds": 3,
                                  "greedy_equal_to_truth": True, "fraction_on_truth": 1.0},
                "alpha=0.95,b=1": {"out_tok_per_s": 300.0, "speedup_vs_off": 3.0,
                                   "greedy_equal_to_spec_off": False, "truth_rounds": 5,
                                   "greedy_equal_to_truth": False,
                                   "fraction_on_truth": 0.974}}}
    results = {"workloads": {"W-SPEC": {}}, "runs": {"W-SPEC": {"llmbatch": spec}}}
    text = report.format_table(report.table_rows(results)).splitlines()
    assert text[3:] == [
        "W-SPEC alpha=0.8,b=1 | llmbatch replay k=4 | 250 | 2.50x spec-off | — | — | —",
        "W-SPEC alpha=0.6,b=1 | llmbatch replay k=4 | 200 | 2.00x spec-off (≠ spec-off in "
        "bf16, truth refined in 3 rounds) | — | — | —",
        "W-SPEC alpha=0.95,b=1 | llmbatch replay k=4 | 300 | 3.00x spec-off (greedy output "
        "DIFFERS, 97% of tokens on the truth, truth refined in 5 rounds) | — | — | —"]


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
                "alpha=0.9,b=1": {"out_tok_per_s": 280.0, "speedup_vs_off": 2.8,
                                  "greedy_equal_to_spec_off": False,
                                  "greedy_equal_to_calibration": False,
                                  "fraction_on_calibration": 0.974},
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
        "W-SPEC alpha=0.9,b=1 | llmbatch replay k=4 | 280 | "
        "2.80x spec-off (greedy output DIFFERS, 97% of tokens on the truth) | — | — | —",
        "W-SPEC old | llmbatch replay k=4 | 90 | 0.90x spec-off (greedy output DIFFERS) | "
        "— | — | —"]


def test_fraction_on_truth_counts_tokens_before_the_first_difference():
    from bench.llmbatch_runner import fraction_on_truth

    truth = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}
    assert fraction_on_truth(truth, truth) == 1.0
    # a: flips at index 2 (the tokens after a flip do not count, even when equal again);
    # b: missing entirely.
    assert fraction_on_truth({"a": [1, 2, 9, 4]}, truth) == 2 / 8
    assert fraction_on_truth({}, {}) == 1.0


def test_spec_rows_include_the_variant_rows_against_llmbatch():
    """--skinny-spec records W-SPEC as llmbatch-skinny-spec (b724b1a): the report shows its
    spec-off and replay rows too, each against llmbatch's row of the same key."""
    def spec(off, replay):
        return {"k": 4, "replay": "measured", "ideal_tokens_per_step": {"0.8": 3.36},
                "batches": {"1": {"out_tok_per_s": off}},
                "replay_runs": {"alpha=0.8,b=1": {"out_tok_per_s": replay,
                                                  "speedup_vs_off": replay / off,
                                                  "greedy_equal_to_spec_off": True}}}
    results = {"workloads": {"W-SPEC": {}}, "runs": {"W-SPEC": {
        "llmbatch": spec(100.0, 250.0), "llmbatch-skinny-spec": spec(110.0, 300.0)}}}
    text = report.format_table(report.table_rows(results)).splitlines()
    assert text[2:] == [
        "W-SPEC b=1 | llmbatch spec-off | 100 | — | — | — | —",
        "W-SPEC alpha=0.8,b=1 | llmbatch replay k=4 | 250 | 2.50x spec-off | — | — | —",
        "W-SPEC b=1 | llmbatch-skinny-spec spec-off | 110 | 1.10x llmbatch | — | — | —",
        "W-SPEC alpha=0.8,b=1 | llmbatch-skinny-spec replay k=4 | 300 | 2.73x spec-off, "
        "1.20x llmbatch | — | — | —"]
    # a variant that failed says so; llmbatch's rows are unchanged
    results["runs"]["W-SPEC"]["llmbatch-skinny-spec"] = {"error": "RuntimeError: x"}
    text = report.format_table(report.table_rows(results)).splitlines()
    assert text[-1].startswith("W-SPEC | llmbatch-skinny-spec | ")
    assert "error: RuntimeError: x" in text[-1]
