"""Sampler: greedy, truncation, seeded batch-invariant sampling, distribution, logprobs."""

import math

import pytest
import torch

from llmbatch.runtime.sampler import Sampler
from llmbatch.runtime.seeded_uniforms import default_seed, row_key, seeded_uniforms
from llmbatch.runtime.sampling_params import SamplingParams as SP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASK64 = (1 << 64) - 1

# Chi-square critical values at p = 0.001 (df -> value). The seeds below are fixed, so each
# statistic is a fixed number: the bound cannot flake, and a wrong distribution exceeds it
# by far (checked in test_chi_square_rejects_wrong_distribution).
CHI2_999 = {1: 10.83, 2: 13.82, 4: 18.47, 15: 37.70}


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def draw(logits_row, params, n=20000, seed=1234):
    """n draws for one logits row: same seed, output indices 0..n-1, one batched call."""
    logits = torch.tensor([logits_row], dtype=torch.float32).expand(n, -1)
    out = Sampler().sample(logits, [params] * n, list(range(n)))
    counts = [0] * len(logits_row)
    for t in out.token_ids:
        counts[t] += 1
    return counts


LOGITS5 = [0.2, 2.0, -1.0, 1.0, 0.0]     # not sorted, so sorting/scatter-back is exercised


def softmax(xs, t=1.0):
    m = max(xs)
    e = [math.exp((x - m) / t) for x in xs]
    return [v / sum(e) for v in e]


# -- greedy ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_lowest_index_ties(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g)
    logits[3, [7, 100, 250]] = 50.0                          # three-way tie -> token 7
    out = Sampler().sample(logits.to(device), [SP()] * 16, [0] * 16)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs == [None] * 16


def test_top_k_1_equals_greedy_including_ties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 50, generator=g)
    logits[0, [4, 9]] = 9.0                                  # tie: greedy and top-k=1 pick 4
    params = [SP(temperature=1.5, top_k=1, seed=s) for s in range(32)]
    out = Sampler().sample(logits, params, list(range(32)))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[0] == 4


def test_greedy_rows_unperturbed_in_mixed_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 40, generator=g)
    params = [SP(seed=5) if r % 2 == 0 else SP(temperature=2.0, seed=r) for r in range(8)]
    out = Sampler().sample(logits, params, [3] * 8)
    for r in range(0, 8, 2):
        assert out.token_ids[r] == int(logits[r].argmax())


# -- seeded randomness -------------------------------------------------------------------
def mixed_params(n):
    configs = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=20, top_p=0.6, logprobs=3),
        dict(temperature=2.0, top_k=-1, top_p=1.0, logprobs=0),
    ]
    return [SP(seed=(r * 7919 + 3) * (1 << 40) + r, **configs[r % len(configs)])
            for r in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_alone_in_batch_and_permuted(device):
    g = torch.Generator().manual_seed(3)
    n = 64
    logits = (torch.randn(n, 257, generator=g) * 2).to(device)
    params = mixed_params(n)
    idx = [r * 3 % 11 for r in range(n)]
    sampler = Sampler()
    batch = sampler.sample(logits, params, idx)
    alone = [sampler.sample(logits[r:r + 1], [params[r]], [idx[r]]).token_ids[0]
             for r in range(n)]
    assert batch.token_ids == alone
    perm = torch.randperm(n, generator=g).tolist()
    permuted = sampler.sample(logits[perm], [params[r] for r in perm], [idx[r] for r in perm])
    assert permuted.token_ids == [batch.token_ids[r] for r in perm]
    # Sampled rows really sample: not all equal to the argmax.
    sampled = [r for r in range(n) if not params[r].greedy]
    assert sum(batch.token_ids[r] != int(logits[r].argmax()) for r in sampled) > 10


def test_different_seeds_and_output_indices_differ():
    logits = torch.zeros(100, 1000)                          # uniform over 1000 tokens
    idx = list(range(100))
    a = Sampler().sample(logits, [SP(temperature=1.0, seed=1)] * 100, idx).token_ids
    b = Sampler().sample(logits, [SP(temperature=1.0, seed=2)] * 100, idx).token_ids
    assert sum(x != y for x, y in zip(a, b)) > 90
    # Same seed, shifted output indices: a different stream.
    c = Sampler().sample(logits, [SP(temperature=1.0, seed=1)] * 100,
                         [i + 1 for i in idx]).token_ids
    assert sum(x != y for x, y in zip(a, c)) > 90
    assert len(set(a)) > 80


def test_default_seeds_for_unseeded_requests():
    logits = torch.zeros(20, 500)
    s = default_seed(base_seed=42, arrival_index=7)
    assert s == default_seed(42, 7)
    assert len({default_seed(42, i) for i in range(1000)} | {default_seed(43, 0)}) == 1001
    unseeded = Sampler().sample(logits, [SP(temperature=1.0)] * 20, list(range(20)),
                                default_seeds=[s] * 20).token_ids
    seeded = Sampler().sample(logits, [SP(temperature=1.0, seed=s)] * 20,
                              list(range(20))).token_ids
    assert unseeded == seeded
    # An explicit seed wins over the default.
    other = Sampler().sample(logits, [SP(temperature=1.0, seed=s + 1)] * 20, list(range(20)),
                             default_seeds=[s] * 20).token_ids
    assert other != seeded


# -- the uniform generator -------------------------------------------------------------------
def reference_uniform(seed, output_index, col):
    """Pure-Python splitmix64 (exact unsigned arithmetic) for one element."""
    z = (row_key(seed, output_index) + (col + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return ((z >> 41) + 0.5) / (1 << 23)


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_match_python_reference(device):
    seeds, idx = [0, 1, (1 << 64) - 1, -5, 123456789], [0, 5, 17, 2, 1 << 20]
    u = seeded_uniforms(seeds, idx, 300, device).cpu()
    for r in range(len(seeds)):
        for col in (0, 1, 2, 150, 299):
            assert u[r, col].item() == reference_uniform(seeds[r], idx[r], col)


def test_uniforms_unbiased():
    u = seeded_uniforms(list(range(64)), [i % 4 for i in range(64)], 16384).double()
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 2e-3                 # std of the mean ~ 3e-4
    assert abs(u.var().item() - 1 / 12) < 2e-3
    hist = torch.histc(u, bins=16, min=0.0, max=1.0).tolist()
    assert chi_square(hist, [1 / 16] * 16) < CHI2_999[15]
    # Neighbouring columns and neighbouring rows are uncorrelated.
    c = u - 0.5
    assert abs((c[:, 1:] * c[:, :-1]).mean().item()) * 12 < 0.01
    assert abs((c[1:] * c[:-1]).mean().item()) * 12 < 0.01


# -- distributions -----------------------------------------------------------------------
def test_temperature_sampling_matches_softmax():
    counts = draw(LOGITS5, SP(temperature=0.7, seed=11))
    assert chi_square(counts, softmax(LOGITS5, 0.7)) < CHI2_999[4]


def test_chi_square_rejects_wrong_distribution():
    # The same draws against the distribution without temperature: far outside the bound.
    counts = draw(LOGITS5, SP(temperature=0.7, seed=11))
    assert chi_square(counts, softmax(LOGITS5, 1.0)) > 10 * CHI2_999[4]


def test_top_k_truncates_exactly():
    counts = draw(LOGITS5, SP(temperature=1.0, top_k=2, seed=12))
    assert counts[0] == counts[2] == counts[4] == 0          # only tokens 1 and 3 survive
    p = softmax([LOGITS5[1], LOGITS5[3]])
    assert chi_square([counts[1], counts[3]], p) < CHI2_999[1]


def test_top_p_truncates_exactly():
    probs = softmax(LOGITS5)                                 # sorted order: 1, 3, 0, 4, 2
    cum2, cum3 = probs[1] + probs[3], probs[1] + probs[3] + probs[0]
    counts = draw(LOGITS5, SP(temperature=1.0, top_p=(cum2 + cum3) / 2, seed=13))
    assert counts[4] == counts[2] == 0
    kept = [probs[1], probs[3], probs[0]]
    assert chi_square([counts[1], counts[3], counts[0]], [q / sum(kept) for q in kept]) \
        < CHI2_999[2]
    # top_p below the top token's probability: always the top token.
    assert draw(LOGITS5, SP(temperature=1.0, top_p=probs[1] / 2, seed=14), n=500) \
        == [0, 500, 0, 0, 0]


def test_top_k_then_top_p_renormalises_over_top_k():
    # top_k=3 keeps tokens 1, 3, 0; renormalised, token 1 alone has mass q1 < top_p < q1+q3,
    # so top-p keeps tokens 1 and 3 only (over the full softmax, top-p alone would differ).
    probs = softmax([LOGITS5[1], LOGITS5[3], LOGITS5[0]])
    top_p = probs[0] + probs[1] * 0.5
    counts = draw(LOGITS5, SP(temperature=1.0, top_k=3, top_p=top_p, seed=15))
    assert counts[0] == counts[2] == counts[4] == 0
    p = softmax([LOGITS5[1], LOGITS5[3]])
    assert chi_square([counts[1], counts[3]], p) < CHI2_999[1]


# -- logprobs ----------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 30, generator=g)
    params = [SP(temperature=0.5, top_k=3, seed=1, logprobs=5), SP(), SP(logprobs=0),
              SP(temperature=1.0, seed=2, logprobs=30)]
    out = Sampler().sample(logits, params, [0, 0, 0, 0])
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for r in (0, 2, 3):
        lp = out.logprobs[r]
        tok = out.token_ids[r]
        assert lp["token_id"] == tok
        assert lp["logprob"] == pytest.approx(ref[r, tok].item(), abs=1e-6)
        n = params[r].logprobs
        assert len(lp["top"]) == n
        top_lp, top_ids = torch.topk(ref[r], n)
        assert [t for t, _ in lp["top"]] == top_ids.tolist()
        assert [v for _, v in lp["top"]] == pytest.approx(top_lp.tolist(), abs=1e-6)
    assert out.logprobs[2]["top"] == []
    assert out.logprobs[2]["token_id"] == int(logits[2].argmax())


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logits, params, idx, defaults, message",
    [
        (torch.zeros(3), [SP()], [0], None, "2-D tensor"),
        (torch.zeros(2, 3, dtype=torch.int64), [SP()] * 2, [0, 0], None, "floating point"),
        (torch.zeros(2, 3), [SP()], [0, 0], None, "2 rows but got 1 params"),
        (torch.zeros(2, 3), [SP()] * 2, [0], None, "1 output indices"),
        (torch.zeros(2, 3), [SP()] * 2, [0, 0], [1], "1 default seeds"),
        (torch.zeros(1, 3), [SP()], [-1], None, "output index must be >= 0"),
        (torch.zeros(1, 3), [SP(logprobs=4)], [0], None, "exceeds the vocabulary size 3"),
        (torch.zeros(1, 3), [SP(temperature=1.0)], [0], None, "seed is None"),
        (torch.zeros(1, 3), [SP(temperature=1.0)], [0], [None], "seed is None"),
    ],
)
def test_bad_input_raises_clear_error(logits, params, idx, defaults, message):
    with pytest.raises(ValueError, match=message):
        Sampler().sample(logits, params, idx, default_seeds=defaults)


def test_default_seed_rejects_negative_arrival_index():
    with pytest.raises(ValueError, match="arrival_index must be >= 0"):
        default_seed(0, -1)


@pytest.mark.parametrize("vocab", [16384, 20000, 50257, 128256])  # 50257: padded chunks
def test_two_stage_greedy_argmax_equals_torch_argmax(vocab):
    """The chunked argmax (used on CUDA for few rows) picks exactly torch.argmax's index:
    first maximum on ties, first NaN when there is one, 0 for a row of -inf."""
    from llmbatch.runtime.greedy_argmax import greedy_argmax

    g = torch.Generator().manual_seed(vocab)
    for trial in range(40):
        x = torch.randn(3, vocab, generator=g)
        if trial % 5 == 0:
            x[:, 5000] = 10.0
            x[:, 100] = 10.0                              # a tie across chunks: 100 wins
        if trial % 7 == 0:
            x[1, 9000] = float("nan")
            x[1, 7000] = float("nan")                     # the first NaN wins
        if trial % 11 == 0:
            x[2] = float("-inf")
        if trial % 13 == 0:
            x = x.round()                                 # many ties inside chunks
        want = torch.argmax(x, dim=-1)
        assert torch.equal(greedy_argmax(x, two_stage=True), want), trial
        assert torch.equal(greedy_argmax(x), want), trial          # CPU: the one-pass path


def test_two_stage_greedy_argmax_takes_strided_and_empty_logits():
    """The LM head's TP gather slices off padding columns: float32 logits arrive non-contiguous
    (logits.float() is then a no-op). The chunked path must not need a contiguous tensor, nor
    rows (Sampler.sample accepts zero rows)."""
    from llmbatch.runtime.greedy_argmax import greedy_argmax

    full = torch.randn(2, 32768 + 7, generator=torch.Generator().manual_seed(3))
    x = full[:, :32768]                                  # 32768 = 32 chunks of 1024, no padding
    assert not x.is_contiguous()
    assert torch.equal(greedy_argmax(x, two_stage=True), torch.argmax(x, dim=-1))
    empty = torch.empty(0, 32768)
    assert greedy_argmax(empty, two_stage=True).shape == (0,)
