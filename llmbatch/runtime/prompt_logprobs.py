"""vLLM's prompt_logprobs: the log-probability of every prompt token after the first, given the
tokens before it, with the top-n alternatives (SamplingParams.prompt_logprobs = n).

The logits at prompt position p score prompt token p + 1. step_inputs lists those positions
of a step's prefill spans as score rows (StepInputs.score_rows, their target ids in
score_token_ids); ModelRunner.forward_logits calls score_prompt_rows with the step's hidden
states. Each entry is the output logprobs' format, {"token_id", "logprob", "top": [(id,
logprob), ...]}, appended to req.prompt_logprobs, whose first element is None (the first token
has no context), as vLLM's.

Invariants:
  * A request with prompt logprobs pending takes no prefix-cache hit (Request.
    prompt_logprobs_pending, scheduler_admission): a cached position has no logits.
  * Rows are scored in increasing order, one chunk after another, so entries are appended in
    prompt order; a request preempted mid-prompt recomputes it and scores only the tokens it
    has no entry for (step_inputs._add_score_rows).
  * Logprobs are of the raw logits (no temperature or penalties), like the output logprobs.

Memory: a prefill chunk can be thousands of rows; their logits are computed SLICE_ROWS at a
time ((SLICE_ROWS, vocab) float32: 256 MB at a 128k vocabulary). Under tensor parallelism
every rank runs the same slices (compute_logits gathers the vocabulary shards collectively);
rank 0 alone turns them into entries.
"""

from __future__ import annotations

from typing import Callable

import torch

SLICE_ROWS = 512


@torch.inference_mode()
def score_prompt_rows(s, hidden: torch.Tensor, compute_logits: Callable, h2d: Callable,
                      record: bool) -> None:
    """hidden (num_tokens, hidden_size): the step's final hidden states. compute_logits: the
    model's (rows, hidden) -> (rows, vocab) float32. h2d(list, dtype): a host list on the
    device. record: this rank writes the entries (rank 0; the others only join the
    collectives)."""
    rows = s.score_rows
    for lo in range(0, len(rows), SLICE_ROWS):
        hi = min(lo + SLICE_ROWS, len(rows))
        logits = compute_logits(hidden.index_select(0, h2d(rows[lo:hi], torch.long)))
        if record:
            _record(logits.float(), s.score_requests[lo:hi], s.score_token_ids[lo:hi], h2d)


def _record(logits: torch.Tensor, requests: list, token_ids: list[int], h2d: Callable) -> None:
    """logits (n, vocab) float32 -> one entry appended to each request's prompt_logprobs."""
    n = logits.shape[0]
    logprobs = torch.log_softmax(logits, dim=-1)                          # (n, V)
    chosen = logprobs.gather(1, h2d(token_ids, torch.long)[:, None]).squeeze(1)
    max_k = max(r.sampling_params.prompt_logprobs for r in requests)
    parts = [chosen.double()]
    if max_k > 0:
        top_lp, top_ids = torch.topk(logprobs, max_k, dim=-1)             # (n, max_k), sorted
        parts += [top_ids.double().flatten(), top_lp.double().flatten()]
    host = torch.cat(parts).tolist()          # one device -> host copy for the slice
    ids_at, lps_at = n, n + n * max_k
    for i, (req, token) in enumerate(zip(requests, token_ids)):
        k = req.sampling_params.prompt_logprobs
        top = list(zip(map(int, host[ids_at + i * max_k: ids_at + i * max_k + k]),
                       host[lps_at + i * max_k: lps_at + i * max_k + k]))
        req.prompt_logprobs.append({"token_id": token, "logprob": host[i], "top": top})
