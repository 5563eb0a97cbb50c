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
