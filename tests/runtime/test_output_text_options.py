"""vLLM's include_stop_str_in_output and skip_special_tokens: they change output_text only (the
ids are the same either way, a stop token stays the last id).

The rule, as vLLM's detokenizer applies it (llmbatch/runtime/stop_rules.py has the evidence):
a stop string cuts the text right before it (False, the default) or right after it (True),
dropping any text after it in the same token; a stop token (EOS, stop_token_ids) is not
detokenized unless include_stop_str_in_output; skip_special_tokens is the decode argument.
Oracle: the tokenizer's own decode of the output ids, cut where that rule cuts
(`vllm_text`). Sync, async and speculative engines must give the same fields.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import EchoLast, generate, make_model, make_prompts, new_engine

MAX_NEW = 12
EOS = 2          # "</s>", a special token of the tiny tokenizer
PROMPTS = make_prompts(8, seed=11)


def vllm_text(tok, result, params: SamplingParams) -> str:
    """The output text vLLM gives for these ids and this ending, from tok.decode."""
    ids, skip = result.output_token_ids, params.skip_special_tokens
    include = params.include_stop_str_in_output
    if isinstance(result.stop_reason, str):
        full = tok.decode(ids, skip_special_tokens=skip)
        pos = full.find(result.stop_reason)
        assert pos >= 0
        return full[:pos + len(result.stop_reason)] if include else full[:pos]
    if result.finish_reason == "stop" and not include:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=skip)


def run_one(setup, prompt, **params):
    return generate(new_engine(setup), [Request(0, prompt, SamplingParams(
        max_new_tokens=MAX_NEW, **params))])[0]


@pytest.fixture(scope="module")
def free(llama_setup):
    """Free runs (no stop) of PROMPTS: results by index."""
    return generate(new_engine(llama_setup), [Request(i, p, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)])


def _pieces(tok, ids):
    """(start, end) of each token's text in decode(ids), None where a token does not add a
    clean piece (a split multi-byte character, a skipped special token)."""
    texts = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    out = []
    for i in range(len(ids)):
        a, b = texts[i], texts[i + 1]
        clean = (b.startswith(a) and len(b) > len(a) and texts[-1].startswith(b)
                 and "\ufffd" not in b)
        out.append((len(a), len(b)) if clean else None)
    return out


def _stop_case(tok, free, where):
    """(prompt, free-run ids, index of the token that completes the stop, stop string, its
    offset in the text): the first stop string in a free run that lies inside one token with
    text on both sides ("mid-token"), or starts at the last character of a token and ends
    before the end of the next ("two-tokens"); it occurs nowhere earlier."""
    for r in range(len(PROMPTS)):
        ids = free[r].output_token_ids
        full, pieces = tok.decode(ids), _pieces(tok, ids)
        for i in range(len(ids) - 1):
            if where == "mid-token" and pieces[i] and pieces[i][1] - pieces[i][0] >= 3:
                start, end = pieces[i]
                s, last = full[start + 1:end - 1], i
            elif (where == "two-tokens" and pieces[i] and pieces[i + 1]
                  and pieces[i + 1][1] - pieces[i + 1][0] >= 2):
                s, last = full[pieces[i][1] - 1:pieces[i + 1][1] - 1], i + 1
            else:
                continue
            pos = full.find(s)
            if pos == (pieces[i][0] + 1 if where == "mid-token" else pieces[i][1] - 1):
                return PROMPTS[r], ids, last, s, pos
    raise AssertionError(f"no {where} stop string in the free runs")


@pytest.mark.parametrize("include", [None, False, True])
@pytest.mark.parametrize("where", ["mid-token", "two-tokens"])
def test_stop_string_is_cut_before_or_after_it(llama_setup, free, where, include):
    _, tok = llama_setup
    prompt, ids, last, stop, pos = _stop_case(tok, free, where)
    kwargs = {} if include is None else dict(include_stop_str_in_output=include)
    got = run_one(llama_setup, prompt, ignore_eos=True, stop=[stop], **kwargs)
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    assert got.output_token_ids == ids[:last + 1]       # the same ids either way
    full = tok.decode(got.output_token_ids)
    assert full.find(stop) == pos and len(full) > pos + len(stop)   # text after it, cut
    want = full[:pos + len(stop)] if include else full[:pos]
    assert got.output_text == want
    assert got.output_text.endswith(stop) == bool(include)


def test_stop_token_text_is_kept_with_include_stop_str_in_output(llama_setup, free):
    # An ordinary stop_token_ids token: left out by default (tests/runtime/
    # test_stop_token_text.py), its text kept with include_stop_str_in_output.
    _, tok = llama_setup
    ids = free[0].output_token_ids
    first = next(i for i, t in enumerate(ids) if i >= 2 and t not in ids[:i]
                 and t not in tok.all_special_ids and tok.decode([t]))
    for stops in ([], ["never in this output \u2603"]):   # final decode / incremental text
        got = run_one(llama_setup, PROMPTS[0], ignore_eos=True, stop_token_ids=[ids[first]],
                      stop=stops, include_stop_str_in_output=True)
        assert (got.finish_reason, got.stop_reason) == ("stop", ids[first])
        assert got.output_token_ids == ids[:first + 1]
        assert got.output_text == tok.decode(ids[:first + 1])
        assert got.output_text != tok.decode(ids[:first])


@pytest.fixture(scope="module")
def eos_setup(tmp_path_factory, llama_setup):
    """(model dir, tokenizer) of a tiny Llama that emits EOS (special) where llama_setup's
    model emits its most frequent token: EOS's lm_head row is twice that token's, so its
    logit wins wherever that token's was the (positive) maximum."""
    _, tok = llama_setup
    path = tmp_path_factory.mktemp("eos")
    hf = make_model(path, arch="llama", eos_token_id=EOS)
    runs = generate(new_engine((path, tok)), [Request(i, p, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    counts = Counter(t for r in runs.values() for t in r.output_token_ids[1:]
                     if t not in tok.all_special_ids)
    with torch.no_grad():
        hf.lm_head.weight[EOS] = 2.0 * hf.lm_head.weight[counts.most_common(1)[0][0]]
    hf.save_pretrained(path, safe_serialization=True)
    return path, tok


def test_skip_special_tokens_false_keeps_a_special_tokens_text(eos_setup):
    _, tok = eos_setup
    prompt = next(p for p in PROMPTS if EOS in run_one(
        eos_setup, p, ignore_eos=True).output_token_ids[1:-1])
    default = run_one(eos_setup, prompt, ignore_eos=True)
    kept = run_one(eos_setup, prompt, ignore_eos=True, skip_special_tokens=False)
    assert kept.output_token_ids == default.output_token_ids
    assert default.output_text == tok.decode(default.output_token_ids, skip_special_tokens=True)
    assert "</s>" not in default.output_text
    assert kept.output_text == tok.decode(kept.output_token_ids, skip_special_tokens=False)
    assert "</s>" in kept.output_text
    # A stop string is looked for in that text: "</s>" ends it only when it is kept.
    for include in (False, True):
        got = run_one(eos_setup, prompt, ignore_eos=True, skip_special_tokens=False,
                      stop=["</s>"], include_stop_str_in_output=include)
        first = got.output_token_ids.index(EOS)
        assert (got.finish_reason, got.stop_reason) == ("stop", "</s>")
        assert got.output_token_ids == default.output_token_ids[:first + 1]
        assert got.output_text == tok.decode(got.output_token_ids[:first + include],
                                             skip_special_tokens=False)
    skipped = run_one(eos_setup, prompt, ignore_eos=True, stop=["</s>"])
    assert skipped.finish_reason == "length" and skipped.output_text == default.output_text


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_eos_text_needs_include_stop_str_in_output(eos_setup, skip, include):
    # vLLM: a stop token is not detokenized unless include_stop_str_in_output; then
    # skip_special_tokens decides whether EOS's text shows.
    _, tok = eos_setup
    prompt = next(p for p in PROMPTS if EOS in run_one(eos_setup, p).output_token_ids[1:])
    got = run_one(eos_setup, prompt, skip_special_tokens=skip,
                  include_stop_str_in_output=include)
    assert (got.finish_reason, got.stop_reason, got.output_token_ids[-1]) == ("stop", EOS, EOS)
    assert got.output_text == tok.decode(got.output_token_ids[:len(got.output_token_ids)
                                                              - (not include)],
                                         skip_special_tokens=skip)
    assert got.output_text.endswith("</s>") == (include and not skip)


ENGINES = {
    "sync": (dict(), False),
    "async": (dict(async_scheduling=True), False),
    "ngram": (dict(speculative_method="ngram"), False),
    "echo-spec": (dict(), True),          # drafts always offered: bonus tokens past stops
    "async-echo-spec": (dict(async_scheduling=True), True),
}


def test_options_give_the_same_text_sync_async_and_speculative(eos_setup, free):
    _, tok = eos_setup
    base = generate(new_engine(eos_setup), [Request(i, p, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    options = [dict(include_stop_str_in_output=True), dict(skip_special_tokens=False),
               dict(include_stop_str_in_output=True, skip_special_tokens=False),
               dict(ignore_eos=True, skip_special_tokens=False),
               dict(ignore_eos=True, skip_special_tokens=False, stop=["</s>"],
                    include_stop_str_in_output=True)]
    params = []
    for i in range(2 * len(PROMPTS)):
        text = base[i % len(PROMPTS)].output_text
        extra = [dict(ignore_eos=True, stop=[text[4:6]], include_stop_str_in_output=True),
                 dict(ignore_eos=True, stop=[text[4:6]])] if len(text) >= 6 else []
        params.append(SamplingParams(max_new_tokens=MAX_NEW,
                                     **(options + extra)[i % len(options + extra)]))
    prompts = PROMPTS * 2
    results, accepted = {}, {}
    for name, (kwargs, echo) in ENGINES.items():
        engine = new_engine(eos_setup, **kwargs)
        if echo:
            engine.set_proposer(EchoLast())
        got = generate(engine, [Request(i, p, params[i]) for i, p in enumerate(prompts)])
        results[name] = [(r.output_token_ids, r.output_text, r.finish_reason, r.stop_reason)
                         for r in (got[i] for i in range(len(prompts)))]
        accepted[name] = sum(r.spec_accepted_tokens for r in got.values())
        for i in range(len(prompts)):
            assert got[i].output_text == vllm_text(tok, got[i], params[i]), (name, i)
    for name in ENGINES:
        assert results[name] == results["sync"], name
    assert all(accepted[name] > 0 for name in ("ngram", "echo-spec", "async-echo-spec"))
    endings = Counter((r[2], type(r[3]).__name__) for r in results["sync"])
    assert endings[("stop", "str")] and endings[("stop", "int")] and endings[("length", "NoneType")]


def test_stop_string_checker_cuts_after_the_stop_with_include_in_output():
    from llmbatch.runtime.detokenizer import StopMatch, StopStringChecker

    text = "hello EN" + "D more"           # the stop completed by a chunk with text after it
    assert StopStringChecker(["END"]).check(text, 6) == StopMatch("END", 6)
    assert StopStringChecker(["END"], include_in_output=True).check(text, 6) == StopMatch(
        "END", 9)
    # Earliest match first, ties to the longer stop string, as without the flag.
    assert StopStringChecker(["ab", "abc"], True).check("xxabc", 3) == StopMatch("abc", 5)


def test_defaults_and_validation():
    p = SamplingParams()
    assert p.include_stop_str_in_output is False and p.skip_special_tokens is True
    for name in ("include_stop_str_in_output", "skip_special_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be true or false, got 'yes'"):
            SamplingParams(**{name: "yes"})
