"""Truncation of sampled rows' distributions (sampler.py): min-p, top-k, then top-p."""

from __future__ import annotations

from typing import Optional

import torch

from llmbatch.runtime.device import host_to_device


def truncate(
    scores: torch.Tensor, trunc: list[int], top_ks: list[int], top_ps: list[float],
    min_ps: Optional[list[float]] = None,
) -> torch.Tensor:
    """Set to -inf the tokens that min-p and top-k, then top-p, exclude in rows `trunc` of
    scores (temperature-scaled logits).

    Works in sorted order (stable, descending, so equal scores keep the lower token id first):
    min-p keeps the tokens whose probability is >= min_p times the top token's, i.e. whose
    score is >= the top score + log(min_p) (no softmax needed); top-k keeps exactly the first
    k positions (ties at the k-th value broken by token id, so top_k=1 equals greedy); top-p
    then renormalises over the survivors and keeps position i iff the probability mass
    strictly before it is < top_p, i.e. the smallest prefix whose cumulative probability
    reaches top_p; position 0 is always kept.
    """
    device = scores.device
    idx_t = host_to_device(trunc, torch.int64, device)
    sub = scores.index_select(0, idx_t)                                  # (m, V)
    sorted_scores, order = torch.sort(sub, dim=-1, descending=True, stable=True)
    positions = torch.arange(sub.shape[1], device=device)[None, :]      # (1, V)
    ks = host_to_device(top_ks, torch.int64, device)[:, None]
    keep = positions < ks                                                # (m, V) sorted order
    if min_ps is not None and any(p > 0.0 for p in min_ps):
        log_min_p = torch.log(host_to_device(min_ps, torch.float32, device))[:, None]
        keep &= sorted_scores >= sorted_scores[:, :1] + log_min_p      # log(0) = -inf: all
    if any(p < 1.0 for p in top_ps):
        ps = host_to_device(top_ps, torch.float32, device)[:, None]
        probs = torch.softmax(sorted_scores.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep &= mass_before < ps
        keep[:, 0] = True
    # Back from sorted positions to token ids.
    keep_by_token = torch.zeros_like(keep).scatter_(1, order, keep)
    sub = sub.masked_fill(~keep_by_token, float("-inf"))
    return scores.index_copy(0, idx_t, sub)
