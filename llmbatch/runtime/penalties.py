"""Repetition, presence and frequency penalties on a step's logits (SamplingParams), and
min_tokens' suppression of the stop token ids (suppress_stop_tokens, at the end).

    repetition_penalty p (transformers' RepetitionPenaltyLogitsProcessor, vLLM's): for every
        token id in the prompt or the output so far, logit / p where the logit is > 0, logit * p
        otherwise (p > 1 discourages repeats);
    presence_penalty a, frequency_penalty f (OpenAI's, vLLM's): logit - a * [count > 0] - f *
        count, count = occurrences of the token id in the output so far (not the prompt).

Applied to the rows that ask for them, before greedy argmax, temperature and truncation; the
logprobs stay those of the raw logits (sampler.py).

A row's history is its request's prompt + output token ids ON THE HOST, so it must be complete
when the row samples: while a penalized request is running the engine runs its steps
synchronously (no token in flight; its first token, from the prompt alone, may come from an
async step) and gives such requests no speculative drafts (a verify row at position j would need
the drafts before j in its history). penalize() checks the invariant: the row's output index
must equal the number of output tokens the host has.

Cost: host lists of the penalized rows' token ids (prompt ids deduplicated once per request)
and two scatters into (rows, vocab) tensors per step; nothing at all for steps without them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmbatch.runtime.device import host_to_device
from llmbatch.runtime.token_rules import ban_tokens, full_history


def _unique_prompt_ids(req) -> list[int]:
    """The request's distinct prompt token ids, computed once (the prompt never changes)."""
    ids = getattr(req, "penalty_prompt_ids", None)   # a Request field; test stand-ins lack it
    if ids is None:
        ids = sorted(set(req.prompt_token_ids))
        if hasattr(req, "penalty_prompt_ids"):
            req.penalty_prompt_ids = ids
    return ids


def penalize(logits: torch.Tensor, rows: Sequence[int], params: Sequence, requests: Sequence,
             output_indices: Sequence[int]) -> torch.Tensor:
    """logits (num_rows, V) float32 -> a copy with the penalties of `params[i]` applied to row
    `rows[i]`, whose request is requests[i] sampling output token output_indices[i]."""
    out_ids, seen_rows, seen_ids, count_rows = [], [], [], []
    for i, (req, idx) in enumerate(zip(requests, output_indices)):
        output = full_history(req, idx, "penalized", "penalties")
        if params[i].repetition_penalty != 1.0:
            prompt = _unique_prompt_ids(req)
            seen_ids += prompt
            seen_ids += output
            seen_rows += [i] * (len(prompt) + len(output))
        out_ids += output
        count_rows += [i] * len(output)
    device = logits.device
    n, vocab = len(rows), logits.shape[1]
    rows_t = host_to_device(list(rows), torch.int64, device)
    sub = logits.index_select(0, rows_t)                                   # (n, V)
    if seen_ids:
        seen = torch.zeros((n, vocab), dtype=torch.bool, device=device)
        seen[host_to_device(seen_rows, torch.int64, device),
             host_to_device(seen_ids, torch.int64, device)] = True
        rep = host_to_device([p.repetition_penalty for p in params], torch.float32,
                             device)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if out_ids and any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.zeros((n, vocab), dtype=torch.float32, device=device)
        counts.index_put_((host_to_device(count_rows, torch.int64, device),
                           host_to_device(out_ids, torch.int64, device)),
                          torch.ones(len(out_ids), dtype=torch.float32, device=device),
                          accumulate=True)
        pres = host_to_device([p.presence_penalty for p in params], torch.float32, device)
        freq = host_to_device([p.frequency_penalty for p in params], torch.float32, device)
        sub = sub - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
    return logits.index_copy(0, rows_t, sub)


def suppress_stop_tokens(logits: torch.Tensor, rows: Sequence[int], requests: Sequence,
                         output_indices: Sequence[int]) -> torch.Tensor:
    """min_tokens (vLLM's): row rows[i] samples output token output_indices[i] of requests[i];
    below its min_tokens, the ids that would stop it (req.min_tokens_banned: stop_token_ids and
    EOS, with ignore_eos too, as vLLM's; stop_rules.fold_stop_rules) get -inf. Needs only the
    output index, so unlike the penalties it works with a token in flight and on verify rows.
    A stop id past the vocabulary can never be sampled: it is skipped (indexing with it
    raised IndexError and ended every request of the batch)."""
    flat_rows, flat_ids = [], []
    vocab = logits.shape[-1]
    for row, req, idx in zip(rows, requests, output_indices):
        if idx < req.sampling_params.min_tokens:
            ids = [t for t in req.min_tokens_banned if t < vocab]
            flat_rows += [row] * len(ids)
            flat_ids += ids
    return ban_tokens(logits, flat_rows, flat_ids)
