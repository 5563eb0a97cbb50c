"""Repetition / presence / frequency penalties and min-p (runtime/penalties.py, sampler.py,
truncation.py), against transformers and a naive reference.

Oracles: transformers' generate(do_sample=False, repetition_penalty=p) one prompt at a time (no
padding: its processor would penalize the pad id too); for presence / frequency (transformers
has no processor for them) a step-by-step loop over the transformers model's own logits with
OpenAI's formula. Every engine setting (prefix cache, chunked prefill, preemption, async
scheduling, n-gram speculation) must give the same tokens: penalized rows read the host's token
history, so those engines run penalized steps synchronously and draft nothing for them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmbatch.runtime.penalties import penalize
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampler import Sampler
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.truncation import truncate
from tests.runtime.tiny_models import (ENGINE_SETTINGS, VOCAB, generate, make_model,
                                       make_prompts, new_engine,
                                       outputs_sync_async_and_small_batch)

MAX_NEW = 12
EOS = 2
# Per request (cycled): the penalties it samples with; greedy.
PENALTIES = [dict(repetition_penalty=1.3), dict(), dict(presence_penalty=1.5),
             dict(frequency_penalty=0.8), dict(repetition_penalty=0.7),
             dict(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0.4)]


def reference_penalize(logits, prompt, output, p):
    """One row, the definitions written out with loops."""
    out = logits.clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


def naive_greedy(hf, prompt, p, max_new=MAX_NEW):
    """Greedy decoding on the transformers model's logits with the penalties applied by hand."""
    output = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = hf(torch.tensor([prompt + output])).logits[0, -1].float()
            tok = int(torch.argmax(reference_penalize(logits, prompt, output, p)))
            output.append(tok)
            if tok == EOS:
                break
    return output


def request_view(prompt, output, rid="r"):
    return SimpleNamespace(prompt_token_ids=prompt, output_token_ids=output, request_id=rid)


def test_penalize_matches_the_definitions_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g) * 3
    prompts = [[1, 4, 4, 9], [7], [3, 3], [10, 11, 12], [0]]
    outputs = [[4, 20, 20, 20], [], [3, 5, 5], [12, 49], [0, 0, 1]]
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(presence_penalty=1.0),
              SamplingParams(frequency_penalty=0.5, presence_penalty=-0.3),
              SamplingParams(repetition_penalty=0.5, frequency_penalty=2.0),
              SamplingParams(repetition_penalty=1.1, presence_penalty=0.2)]
    rows = [0, 2, 3, 4]          # row 1 is left alone (its params ask nothing of it here)
    got = penalize(logits, rows, [params[r] for r in rows],
                   [request_view(prompts[r], outputs[r]) for r in rows],
                   [len(outputs[r]) for r in rows])
    assert torch.equal(got[1], logits[1])
    for r in rows:
        torch.testing.assert_close(got[r], reference_penalize(logits[r], prompts[r], outputs[r],
                                                              params[r]))


def test_a_row_without_its_full_history_is_refused():
    with pytest.raises(RuntimeError, match=r"request 'r7': a penalized row samples output token "
                                           r"3 but the host has 2; penalties need the full"):
        penalize(torch.zeros(1, 10), [0], [SamplingParams(repetition_penalty=1.2)],
                 [request_view([1], [2, 3], "r7")], [3])
    with pytest.raises(ValueError, match=r"rows with penalties, a grammar or min_tokens need "
                                         r"requests"):
        Sampler().sample(torch.zeros(1, 10), [SamplingParams(presence_penalty=1.0)], [0])


def test_sampler_greedy_takes_the_penalized_argmax_and_raw_logprobs():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, logprobs=1)
    out = Sampler().sample(logits, [p], [1], requests=[request_view([3], [1])])
    assert out.token_ids == [2]                      # 5 / 2 = 2.5 < 4
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0]["logprob"] == pytest.approx(float(raw[2]))
    assert out.logprobs[0]["top"][0] == (1, pytest.approx(float(raw[1])))


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 200, generator=g) * 2
    got = truncate(scores, [0, 1, 2], [200, 200, 5], [1.0, 1.0, 1.0], [0.1, 0.0, 0.3])
    probs = torch.softmax(scores, dim=-1)
    keep0 = probs[0] >= 0.1 * probs[0].max()
    assert torch.equal(torch.isfinite(got[0]), keep0) and 1 < int(keep0.sum()) < 200
    assert torch.isfinite(got[1]).all()              # min_p 0: nothing removed
    keep2 = (probs[2] >= 0.3 * probs[2].max()) & (scores[2] >= scores[2].topk(5).values[-1])
    assert torch.equal(torch.isfinite(got[2]), keep2)


def test_min_p_sampling_never_picks_a_token_below_the_threshold():
    """400 seeds on one row: every sample is a kept token, and several distinct ones occur."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.12, 0.08, 0.05, 0.05]]))
    p = [SamplingParams(temperature=1.0, min_p=0.2, seed=s) for s in range(400)]
    out = Sampler().sample(logits.expand(400, -1), p, [0] * 400)
    assert set(out.token_ids) == {0, 1, 2}           # 0.12 >= 0.2 * 0.5 > 0.08
    assert out.token_ids.count(0) > out.token_ids.count(2)


@pytest.fixture(scope="module")
def hf_and_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("pen-llama")
    hf = make_model(path, arch="llama", eos_token_id=EOS)
    prompts = make_prompts(18, seed=3)
    params = [SamplingParams(max_new_tokens=MAX_NEW, **PENALTIES[i % len(PENALTIES)])
              for i in range(len(prompts))]
    expected = [naive_greedy(hf, pr, pa) for pr, pa in zip(prompts, params)]
    return path, hf, prompts, params, expected


def test_naive_oracle_equals_transformers_generate_for_repetition_penalty(hf_and_prompts):
    _, hf, prompts, params, expected = hf_and_prompts
    checked = 0
    for prompt, p, want in zip(prompts, params, expected):
        if p.presence_penalty or p.frequency_penalty:
            continue
        with torch.no_grad():
            g = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                            repetition_penalty=p.repetition_penalty, eos_token_id=EOS,
                            pad_token_id=0)
        got = g[0, len(prompt):].tolist()
        assert (got[: got.index(EOS) + 1] if EOS in got else got) == want
        checked += 1
    assert checked == 9
    plain = [i for i, p in enumerate(params) if not p.has_penalties]
    penalized = [naive_greedy(hf, prompts[i], SamplingParams(repetition_penalty=1.3))
                 for i in plain]
    assert penalized != [expected[i] for i in plain]   # the penalty changes these outputs


SETTINGS = ENGINE_SETTINGS


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine_greedy_with_penalties_matches_the_oracle(hf_and_prompts, tokenizer, setting):
    path, _, prompts, params, expected = hf_and_prompts
    engine = new_engine((path, tokenizer), **SETTINGS[setting])
    reqs = [Request(i, pr, pa) for i, (pr, pa) in enumerate(zip(prompts, params))]
    results = generate(engine, reqs)
    got = [results[i].output_token_ids for i in range(len(prompts))]
    mismatches = [i for i in range(len(prompts)) if got[i] != expected[i]]
    assert not mismatches, (f"{len(mismatches)} differ; first {mismatches[0]} "
                            f"({PENALTIES[mismatches[0] % len(PENALTIES)]}): "
                            f"{got[mismatches[0]]} != {expected[mismatches[0]]}")
    accepted = [results[i].spec_accepted_tokens for i in range(len(prompts))]
    assert all(accepted[i] == 0 for i, p in enumerate(params) if p.has_penalties)  # no drafts
    if "spec" in setting:   # speculation did run for the others
        assert sum(accepted[i] for i, p in enumerate(params) if not p.has_penalties) > 0
    if "preemption" in setting:
        assert engine.stats()["num_preemptions"] > 0
    assert not engine._history_ids                  # every penalized request finished


def test_sampled_rows_with_penalties_are_seeded_and_async_equals_sync(hf_and_prompts, tokenizer):
    path, _, prompts, _, _ = hf_and_prompts
    params = [SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, top_p=0.9, min_p=0.05,
                             seed=100 + i, **PENALTIES[i % len(PENALTIES)])
              for i in range(len(prompts))]
    runs = outputs_sync_async_and_small_batch((path, tokenizer), prompts, params)
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert len({tuple(r) for r in runs[0]}) > len(prompts) // 2   # not one degenerate output
    assert all(0 <= t < VOCAB for r in runs[0] for t in r)


def test_penalized_requests_admitted_late_keep_the_job_async_until_they_run(hf_and_prompts,
                                                                          tokenizer):
    """72 requests, max_num_seqs 2, the last 4 penalized: they are admitted (admission runs
    ~64 requests ahead) long before they run. Steps stay async until one of them runs, and the
    tokens equal the synchronous engine's (also with n-gram speculation)."""
    path, _, _, _, _ = hf_and_prompts
    prompts = make_prompts(72, seed=5)
    params = [SamplingParams(max_new_tokens=6, **(dict(repetition_penalty=1.5,
                                                       frequency_penalty=0.7) if i >= 68 else {}))
              for i in range(72)]
    outs, async_steps = [], []
    for kwargs in (dict(), dict(async_scheduling=True, max_num_seqs=2),
                   dict(async_scheduling=True, max_num_seqs=2, speculative_method="ngram",
                        num_speculative_tokens=2, speculative_max_num_seqs=1)):
        engine = new_engine((path, tokenizer), **kwargs)
        calls = []
        real = engine._step_async
        engine._step_async = lambda: calls.append(1) or real()
        results = generate(engine, [Request(i, pr, pa) for i, (pr, pa) in
                                    enumerate(zip(prompts, params))])
        outs.append([results[i].output_token_ids for i in range(72)])
        async_steps.append((len(calls), engine.stats()["num_steps"]))
        assert not engine._history_ids
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert async_steps[0][0] == 0
    steps, total = async_steps[1]
    assert steps > total * 0.7, async_steps   # only the last requests' steps ran synchronously
