"""min_tokens (vLLM's): no EOS, stop token id or stop string ends a request's output before
min_tokens tokens. Oracle: transformers' generate(min_new_tokens=m, do_sample=False), which
gives EOS -inf while fewer than m tokens are new, on a tiny model whose EOS id is a token it
often generates (so the rule has work to do). Every engine setting must agree: min_tokens needs
only the output index, so async steps and speculation keep running."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llmbatch.runtime.penalties import suppress_stop_tokens
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import generate, make_model, make_prompts, new_engine

MAX_NEW = 10


def hf_greedy_one(hf, prompt, eos, min_new=0, max_new=MAX_NEW):
    with torch.no_grad():
        g = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                        min_new_tokens=min_new, eos_token_id=eos, pad_token_id=0)
    out = g[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.fixture(scope="module")
def frequent_eos_model(tmp_path_factory):
    """(path, hf model, eos id, prompts): EOS is the token greedy decoding emits most often
    among the first 3 output tokens."""
    path = tmp_path_factory.mktemp("min-tokens")
    hf = make_model(path, arch="llama", eos_token_id=2)
    prompts = make_prompts(24, seed=3)
    counts = Counter(t for p in prompts for t in hf_greedy_one(hf, p, eos=None)[:3])
    eos = counts.most_common(1)[0][0]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf, eos, prompts


def test_suppress_stop_tokens_only_below_min_tokens():
    class Req:
        def __init__(self, m, stop_ids):
            self.sampling_params = SamplingParams(min_tokens=m)
            self.min_tokens_banned = frozenset(stop_ids)
    logits = torch.zeros(3, 8)
    got = suppress_stop_tokens(logits, [0, 2], [Req(3, {1, 5}), Req(3, {2})], [2, 3])
    assert torch.isinf(got[0, 1]) and torch.isinf(got[0, 5])
    assert int(torch.isinf(got).sum()) == 2          # row 2 is at index 3 = min_tokens: free
    assert not torch.isinf(logits).any()              # a copy, the input untouched


def test_min_tokens_above_max_new_tokens_is_refused():
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_new_tokens=4\], got 5"):
        SamplingParams(max_new_tokens=4, min_tokens=5)


SETTINGS = {
    "default": dict(),
    "async": dict(async_scheduling=True),
    "chunked-preemption": dict(kv_cache_blocks=12, max_num_batched_tokens=24),
    "ngram-spec": dict(speculative_method="ngram", num_speculative_tokens=3,
                       speculative_max_num_seqs=64),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine_greedy_with_min_tokens_matches_transformers(frequent_eos_model, tokenizer,
                                                            setting):
    path, hf, eos, prompts = frequent_eos_model
    mins = [0 if i % 4 == 0 else 6 for i in range(len(prompts))]
    expected = [hf_greedy_one(hf, p, eos, m) for p, m in zip(prompts, mins)]
    plain = [hf_greedy_one(hf, p, eos) for p in prompts]
    # The rule has work to do: some outputs end on EOS before their min_tokens otherwise.
    assert sum(len(plain[i]) < mins[i] for i in range(len(prompts))) >= 2
    engine = new_engine((path, tokenizer), **SETTINGS[setting])
    assert eos in engine.eos_token_ids
    reqs = [Request(i, p, SamplingParams(max_new_tokens=MAX_NEW, min_tokens=m))
            for i, (p, m) in enumerate(zip(prompts, mins))]
    results = generate(engine, reqs)
    got = [results[i].output_token_ids for i in range(len(prompts))]
    assert got == expected
    assert all(len(g) >= m for g, m in zip(got, mins))


def test_stop_strings_wait_for_min_tokens(frequent_eos_model, tokenizer):
    """A stop string that the first output token already spells ends the output at once
    without min_tokens, and is ignored up to min_tokens with it (vLLM's rule)."""
    path, hf, eos, prompts = frequent_eos_model
    engine = new_engine((path, tokenizer))
    # A prompt whose first greedy token decodes to visible text: that text is the stop string.
    prompt, text = next((p, t) for p in prompts
                        if (t := tokenizer.decode(hf_greedy_one(hf, p, None, max_new=1))).strip())
    stop = dict(stop=[text], ignore_eos=True)
    res = generate(engine, [Request(1, prompt, SamplingParams(max_new_tokens=MAX_NEW, **stop)),
                            Request(2, prompt, SamplingParams(max_new_tokens=MAX_NEW,
                                                              min_tokens=4, **stop))])
    assert (res[1].finish_reason, len(res[1].output_token_ids)) == ("stop", 1)
    assert len(res[2].output_token_ids) >= 4
    assert res[2].output_token_ids[:4] == hf_greedy_one(hf, prompt, None, max_new=4)
