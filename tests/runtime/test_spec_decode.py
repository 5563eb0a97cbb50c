from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.spec_decode import NgramProposer, num_accepted


def req(tokens):
    return Request("r", tokens, SamplingParams())


def test_ngram_prefers_the_longest_most_recent_match():
    p = NgramProposer(min_n=1, max_n=3)
    # Last 3 tokens (1, 2, 3) occur at index 0 and 5; the latest (5) is followed by 9, 9.
    assert p.propose(req([1, 2, 3, 4, 4, 1, 2, 3, 9, 9, 1, 2, 3]), 2) == [9, 9]
    assert p.propose(req([1, 2, 3, 4, 4, 1, 2, 3, 9, 9, 1, 2, 3]), 5) == [9, 9, 1, 2, 3]


def test_ngram_falls_back_to_shorter_suffixes_and_can_propose_nothing():
    p = NgramProposer(min_n=1, max_n=3)
    assert p.propose(req([7, 8, 5, 6, 8]), 2) == [5, 6]      # only "8" recurs
    assert p.propose(req([1, 2, 3, 4]), 3) == []
    assert p.propose(req([1, 1]), 0) == []


def test_num_accepted_counts_leading_matches():
    assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert num_accepted([4, 5, 6], [3, 5, 6, 7]) == 0
    assert num_accepted([], [3]) == 0


def _scan_reference(tokens, num_tokens, min_n, max_n):
    """The proposal by definition: a backward scan per n-gram size, longest size first."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + num_tokens]
    return []


def test_the_incremental_index_proposes_what_a_full_scan_finds():
    """NgramProposer keeps an n-gram index per request, extended as tokens are appended: on
    random growing sequences over small alphabets (many matches), every proposal equals the
    full scan's, including after the index is rebuilt for a shorter token list."""
    import random

    rng = random.Random(0)
    checked = nonempty = 0
    for trial in range(60):
        min_n, max_n = rng.choice([(1, 4), (2, 3), (1, 1)])
        p = NgramProposer(min_n=min_n, max_n=max_n)
        alphabet = rng.choice([3, 5, 20])
        r = req([rng.randrange(alphabet) for _ in range(rng.randint(1, 30))])
        for _ in range(40):
            k = rng.randint(0, 5)
            want = _scan_reference(r.all_token_ids, k, min_n, max_n) if k > 0 else []
            assert p.propose(r, k) == want, (trial, r.all_token_ids, k)
            checked += 1
            nonempty += bool(want)
            r.all_token_ids.extend(rng.randrange(alphabet) for _ in range(rng.randint(0, 4)))
        del r.all_token_ids[len(r.all_token_ids) // 2:]       # shorter: the index rebuilds
        assert p.propose(r, 3) == _scan_reference(r.all_token_ids, 3, min_n, max_n)
    assert checked == 60 * 40 and nonempty > checked // 2
