"""SamplingParams (the runtime API) refuses values of the wrong type at construction. Each of
these passed and then raised TypeError inside an engine step, ending every request in flight,
or ran silently otherwise; a single stop string was taken character by character."""

import numpy as np
import pytest

from llmbatch.runtime.sampling_params import SamplingParams


def test_a_stop_string_is_a_list_of_one_and_none_is_no_stop():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


@pytest.mark.parametrize("kwargs, said", [
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop=["a", 3]), "stop must be a string or a list of strings"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids >= 0, got 5"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids >= 0"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be a list of token ids >= 0"),
    (dict(seed=1.5), "seed must be an integer or null, got 1.5"),
    (dict(logprobs=True), "logprobs must be an integer or null, got True"),
    (dict(prompt_logprobs=2.0), "prompt_logprobs must be an integer or null, got 2.0"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(top_k=-5), "top_k must be >= -1 (-1 or 0: off), got -5"),
    (dict(max_new_tokens=3.5), "max_new_tokens must be an integer, got 3.5"),
    (dict(min_tokens="2"), "min_tokens must be an integer, got '2'"),
    (dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
    (dict(top_p=None), "top_p must be a number, got None"),
    (dict(ignore_eos=1), "ignore_eos must be true or false, got 1"),
])
def test_wrong_types_are_refused(kwargs, said):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(said), str(info.value)


def test_numpy_numbers_are_taken():
    params = SamplingParams(seed=np.int64(3), top_k=np.int32(5), temperature=np.float32(0.5),
                            stop_token_ids=[np.int64(7)], max_new_tokens=np.int64(4))
    assert (params.seed, params.top_k, params.stop_token_ids) == (3, 5, [7])
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=-1).top_k == -1
