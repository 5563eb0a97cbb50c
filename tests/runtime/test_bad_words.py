"""bad_words (vLLM's): a word's token sequences (as written and after a space) are never
completed by the output. Engine greedy equals transformers' generate(bad_words_ids=...) on the
same sequences under every scheduling setting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.token_rules import bad_word_sequences, ban_bad_words
from tests.runtime.tiny_models import (ENGINE_SETTINGS, generate, make_model, make_prompts,
                                       new_engine)

MAX_NEW = 10
EOS = 2


def test_sequences_and_the_ban(tokenizer):
    seqs = bad_word_sequences(tokenizer, ["  hello", "hello"])
    assert seqs == [tokenizer.encode("hello", add_special_tokens=False),
                    tokenizer.encode(" hello", add_special_tokens=False)]
    req = SimpleNamespace(request_id="r", output_token_ids=[7, 3],
                          bad_words_ids=[[5], [3, 9], [7, 4, 8], [1, 6]])
    logits = torch.zeros(2, 12)
    out = ban_bad_words(logits, [1], [req], [2])
    banned = (out[1] == float("-inf")).nonzero().flatten().tolist()
    assert banned == [5, 9]                  # [5] always; [3, 9] after a 3; not [7, 4, 8]
    assert out[0].tolist() == [0.0] * 12 and logits.eq(0).all()
    with pytest.raises(RuntimeError, match="samples output token 3 but the host has 2"):
        ban_bad_words(logits, [0], [req], [3])
    with pytest.raises(ValueError, match="bad_words must be a list of non-blank texts"):
        SamplingParams(bad_words=["ok", " "])


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bw-llama")
    hf = make_model(path, arch="llama", eos_token_id=EOS)
    prompts = make_prompts(16, seed=12)
    engine = new_engine((path, tokenizer))
    plain = generate(engine, [Request(i, p, SamplingParams(max_new_tokens=MAX_NEW))
                              for i, p in enumerate(prompts)])
    # Words the plain outputs do produce (so the ban binds): the text of some output tokens.
    seen = [t for i in range(len(prompts)) for t in plain[i].output_token_ids if t > 2]
    words = list(dict.fromkeys(tokenizer.decode([t]).strip() for t in seen[:12]))
    words = [w for w in words if w][:4]
    seqs = bad_word_sequences(tokenizer, words)
    # transformers checks the prompt too (vLLM and we check the output only): keep prompts
    # whose end cannot start a sequence, so both rules agree.
    firsts = {s[0] for s in seqs if len(s) > 1}
    kept = [p for p in prompts if p[-1] not in firsts]
    want = []
    with torch.no_grad():
        for p in kept:
            g = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                            eos_token_id=EOS, pad_token_id=0, bad_words_ids=seqs)
            out = g[0, len(p):].tolist()
            want.append(out[: out.index(EOS) + 1] if EOS in out else out)
    plain_kept = [plain[i].output_token_ids for i, p in enumerate(prompts) if p in kept]
    return path, kept, words, want, plain_kept


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
def test_engine_greedy_equals_transformers(hf_setup, tokenizer, setting):
    path, prompts, words, want, plain = hf_setup
    assert len(prompts) >= 8 and want != plain          # the ban changes outputs
    engine = new_engine((path, tokenizer), **ENGINE_SETTINGS[setting])
    results = generate(engine, [Request(i, p, SamplingParams(max_new_tokens=MAX_NEW,
                                                             bad_words=words))
                                for i, p in enumerate(prompts)])
    assert [results[i].output_token_ids for i in range(len(prompts))] == want
    assert all(results[i].spec_accepted_tokens == 0 for i in range(len(prompts)))


def test_the_words_of_a_job_are_tokenized_once(tokenizer):
    from llmbatch.runtime.token_rules import BadWordsCache

    calls = []

    class Counting:
        def encode(self, text, add_special_tokens):
            calls.append(text)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    cache = BadWordsCache(Counting(), size=2)
    first = cache(["hello", "world"])
    assert cache(["hello", "world"]) is first and len(calls) == 4
    assert first == bad_word_sequences(tokenizer, ["hello", "world"])
    cache(["a"])
    cache(["b"])                                  # over size: the oldest list goes
    cache(["hello", "world"])
    assert len(calls) == 4 + 2 + 2 + 4
