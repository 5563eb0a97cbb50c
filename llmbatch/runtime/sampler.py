"""Batched token sampler: greedy, temperature, top-k, top-p, min-p, penalties (penalties.py),
seeded per request, logprobs.

Randomness. Sampled rows use the Gumbel-max trick: token = argmax(logits / T + g) over the
tokens that survive top-k/top-p, with g = -log(-log(u)) and u ~ U(0, 1). The uniforms are
not drawn from a torch.Generator: each is a counter-based hash (splitmix64) of
(seed, output_index, vocab index), computed with int64 tensor ops on the logits' device.
So a request's token depends only on its own logits, seed and output index: never on which
other requests share the batch, their order, the device's RNG state, or how many steps ran
before. No per-request generator objects, no host loop over the vocabulary.

Seeds. A request with `SamplingParams.seed` set uses it. A request with seed None uses the
`default_seeds[row]` that the caller passes; the engine should derive it with
`default_seed(base_seed, arrival_index)` (per-engine base seed, the request's position in
arrival order), so an unseeded job is still reproducible run to run. Passing neither is an
error, never a silent fresh random seed.

Logprobs are the log-softmax of the RAW logits (before penalties, temperature, top-k, min-p
and top-p), which is vLLM's default ("raw_logprobs"): they describe the model, not the sampling
transform, and do not become -inf for tokens the truncation removed.

Order, as vLLM's: the logits edits of the rows that ask (they change greedy rows too):
allowed ids and logit bias (token_rules.py), bad words, the grammar mask
(structured_outputs.py), penalties, min_tokens (penalties.py); then per sampled row
temperature, min-p (against the most likely token), top-k, top-p over the survivors,
Gumbel-max.

Invariants: greedy rows (temperature == 0) take torch.argmax of the (penalized) logits (ties:
the lowest token id) and no noise is computed for them. All results reach the host in ONE
device->host copy per call (non-blocking with `sample_async`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_not
from typing import Optional, Sequence

import torch

from llmbatch.runtime.device import host_to_device
from llmbatch.runtime.greedy_argmax import greedy_argmax
from llmbatch.runtime.penalties import penalize, suppress_stop_tokens
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.seeded_uniforms import seeded_uniforms
from llmbatch.runtime.structured_outputs import mask_logits
from llmbatch.runtime.token_rules import apply_token_rules, ban_bad_words
from llmbatch.runtime.truncation import truncate

_LOGPROBS = attrgetter("logprobs")
_TEMPERATURE = attrgetter("temperature")
_EDITS_LOGITS = attrgetter("edits_logits")


def _any_logprobs(params) -> bool:
    """Any row asking for logprobs (0 asks too), scanned in C."""
    return any(map(is_not, map(_LOGPROBS, params), repeat(None)))


def _validate_inputs(logits, params, output_indices, default_seeds):
    """Shared argument checks; returns (num_rows, vocab_size)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"logits must be a 2-D tensor (num_samples, vocab_size), got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    num_rows, vocab_size = logits.shape
    if vocab_size == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if len(params) != num_rows or len(output_indices) != num_rows:
        raise ValueError(f"logits have {num_rows} rows but got {len(params)} params and "
                         f"{len(output_indices)} output indices")
    if default_seeds is not None and len(default_seeds) != num_rows:
        raise ValueError(f"logits have {num_rows} rows but got {len(default_seeds)} "
                         "default seeds")
    # Scanned in C first (min, map): every step passes a few hundred valid rows; only a batch
    # with an error walks the rows in Python, to report the first bad one.
    bad_index = num_rows and min(output_indices) < 0
    if bad_index or _any_logprobs(params):
        for r, (p, idx) in enumerate(zip(params, output_indices)):
            if idx < 0:
                raise ValueError(f"row {r}: output index must be >= 0, got {idx}")
            if p.logprobs is not None and p.logprobs > vocab_size:
                raise ValueError(f"row {r}: logprobs={p.logprobs} exceeds the vocabulary "
                                 f"size {vocab_size}")
    return num_rows, vocab_size


@dataclass
class SamplerOutput:
    """token_ids[row] is the sampled token of each input row. logprobs[row] is None unless
    the row asked for logprobs, else {"token_id", "logprob", "top": [(token_id, logprob)]}
    (the format GenerationResult.logprobs stores per output token); `top` has
    params.logprobs entries, highest first."""

    token_ids: list[int]
    logprobs: list[Optional[dict]]


class PendingSample:
    """Sampling results on their way to the host.

    token_ids: (num_rows,) int64 on the logits' device, final as soon as the GPU has run the
    sampling: the next step may read them on the device before the host has them.
    result(): waits for the one device->host copy and unpacks it into a SamplerOutput.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, lp_counts: list[int],
                 lp_rows: list[int], max_n: int) -> None:
        self.token_ids = token_ids
        self._lp_counts, self._lp_rows, self._max_n = lp_counts, lp_rows, max_n
        self._ready = None
        if packed.is_cuda:
            # Pinned destination + non_blocking: the copy is queued behind the sampling on the
            # stream and the host goes on; an event marks when it has landed.
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            # A copy, as on CUDA: packed may be a view of a CUDA graph's output (graph_logits.py;
            # CPU tests replay graphs eagerly), which the next step rewrites before result().
            self._host = packed.clone()
        self._output: Optional[SamplerOutput] = None

    def result(self) -> SamplerOutput:
        if self._output is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._output = self._unpack(self._host.tolist())
        return self._output

    def _unpack(self, host: list) -> SamplerOutput:
        num_rows = self.token_ids.shape[0]
        if not self._lp_rows:
            return SamplerOutput(token_ids=host, logprobs=[None] * num_rows)
        max_n = self._max_n
        out_ids = [int(t) for t in host[:num_rows]]
        out_lps: list[Optional[dict]] = [None] * num_rows
        ids_at = num_rows + len(self._lp_rows)       # start of the top-n ids block
        lps_at = ids_at + len(self._lp_rows) * max_n  # start of the top-n logprobs block
        for i, (r, n) in enumerate(zip(self._lp_rows, self._lp_counts)):
            ids = host[ids_at + i * max_n: ids_at + i * max_n + n]
            lps = host[lps_at + i * max_n: lps_at + i * max_n + n]
            out_lps[r] = {
                "token_id": out_ids[r],
                "logprob": host[num_rows + i],
                "top": [(int(t), lp) for t, lp in zip(ids, lps)],
            }
        return SamplerOutput(token_ids=out_ids, logprobs=out_lps)


class Sampler:
    """Stateless batched sampler; one instance per model runner."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
        default_seeds: Optional[Sequence[Optional[int]]] = None,
        requests: Optional[Sequence] = None,
    ) -> SamplerOutput:
        """Sample one token per row.

        logits: (num_samples, vocab_size), float (cast to float32), any device.
        params[row], output_indices[row]: the row's request settings and the index of the
        output token being sampled (0 for the first output token).
        default_seeds[row]: seed used when params[row].seed is None (see module docstring).
        requests[row]: the row's Request (its prompt and output token ids), needed only by rows
        with penalties (penalties.py).
        """
        return self.sample_async(logits, params, output_indices, default_seeds,
                                 requests).result()

    def sample_async(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
        default_seeds: Optional[Sequence[Optional[int]]] = None,
        requests: Optional[Sequence] = None,
        greedy_ids: Optional[torch.Tensor] = None,
    ) -> "PendingSample":
        """`sample`, without waiting: enqueues the sampling and one non-blocking copy of its
        results to pinned host memory. `.token_ids` (device) can feed the next step's inputs at
        once; `.result()` waits for the copy (async scheduling, docs/async_scheduling.md).
        greedy_ids: (num_rows,) int64, the argmax of each row of `logits` computed already
        (a decode graph's, graph_logits.py); taken as the greedy tokens unless a row edits
        its logits, where the argmax is taken after the edits as always."""
        num_rows, vocab_size = _validate_inputs(logits, params, output_indices, default_seeds)
        if greedy_ids is not None and tuple(greedy_ids.shape) != (num_rows,):
            raise ValueError(f"greedy_ids must have one id per row ({num_rows}), got shape "
                             f"{tuple(greedy_ids.shape)}")
        logits = logits.float()
        device = logits.device
        raw = logits                                            # for logprobs
        # any(...) in C first: most steps have no row that edits its logits.
        edits = any(map(_EDITS_LOGITS, params))
        if edits:
            # vLLM's order: the token rules (allowed ids, logit bias), then the penalties.
            ruled = [r for r, p in enumerate(params) if p.has_token_rules]
            if ruled:
                logits = apply_token_rules(logits, ruled, [params[r] for r in ruled])
            if (requests is None or len(requests) != num_rows) and any(
                    p.needs_history or p.min_tokens for p in params):
                raise ValueError("rows with penalties, a grammar or min_tokens need "
                                 "requests[row]")
            bad = [r for r, p in enumerate(params) if p.bad_words]
            if bad:
                logits = ban_bad_words(logits, bad, [requests[r] for r in bad],
                                       [output_indices[r] for r in bad])
            # Structured outputs: only what the row's grammar accepts next.
            gram = [r for r, p in enumerate(params) if p.structured_outputs is not None]
            if gram:
                logits = mask_logits(logits, gram, [requests[r] for r in gram],
                                     [output_indices[r] for r in gram])
            pen = [r for r, p in enumerate(params) if p.has_penalties]
            if pen:
                logits = penalize(logits, pen, [params[r] for r in pen],
                                  [requests[r] for r in pen], [output_indices[r] for r in pen])
            short = [r for r, p in enumerate(params) if output_indices[r] < p.min_tokens]
            if short:
                logits = suppress_stop_tokens(logits, short, [requests[r] for r in short],
                                              [output_indices[r] for r in short])
        # (num_rows,) greedy for all
        token_ids = greedy_ids if greedy_ids is not None and not edits else greedy_argmax(logits)

        # any(temperatures) in C first: most steps are all greedy (temperature 0.0).
        sampled_rows = ([r for r, p in enumerate(params) if not p.greedy]
                        if any(map(_TEMPERATURE, params)) else [])
        if sampled_rows:
            seeds = []
            for r in sampled_rows:
                seed = params[r].seed
                if seed is None:
                    seed = default_seeds[r] if default_seeds is not None else None
                if seed is None:
                    raise ValueError(
                        f"row {r}: seed is None and no default_seeds[{r}] given; pass "
                        "default_seed(base_seed, arrival_index) for unseeded requests")
                seeds.append(seed)
            picked = self._sample_rows(
                logits, sampled_rows, [params[r] for r in sampled_rows], seeds,
                [output_indices[r] for r in sampled_rows], vocab_size)
            rows_t = host_to_device(sampled_rows, torch.int64, device)
            token_ids = token_ids.index_copy(0, rows_t, picked)

        # Everything for the host goes in ONE tensor and one copy. Without logprobs that is the
        # int64 token ids as they are; with logprobs, one float64 tensor: token ids (< 2**53,
        # exact), then per logprob row its sampled logprob, then top-n ids and top-n logprobs.
        lp_rows = ([r for r, p in enumerate(params) if p.logprobs is not None]
                   if _any_logprobs(params) else [])
        max_n = max((params[r].logprobs for r in lp_rows), default=0)
        if not lp_rows:
            packed = token_ids
        else:
            parts = [token_ids.to(torch.float64)]
            rows_t = host_to_device(lp_rows, torch.int64, device)
            logprobs = torch.log_softmax(raw.index_select(0, rows_t), dim=-1)  # (R, V)
            chosen = token_ids.index_select(0, rows_t)
            parts.append(logprobs.gather(1, chosen[:, None]).squeeze(1).double())
            if max_n > 0:
                top_lp, top_ids = torch.topk(logprobs, max_n, dim=-1)  # (R, max_n), sorted
                parts += [top_ids.double().flatten(), top_lp.double().flatten()]
            packed = torch.cat(parts)
        return PendingSample(token_ids, packed, [params[r].logprobs for r in lp_rows], lp_rows,
                             max_n)

    @staticmethod
    def _sample_rows(
        logits: torch.Tensor,
        rows: list[int],
        params: list[SamplingParams],
        seeds: list[int],
        output_indices: list[int],
        vocab_size: int,
    ) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p and Gumbel-max for the non-greedy rows ->
        (len(rows),)."""
        device = logits.device
        rows_t = host_to_device(rows, torch.int64, device)
        temps = host_to_device([p.temperature for p in params], torch.float32, device)
        scores = logits.index_select(0, rows_t) / temps[:, None]     # (n, V)

        # top_k <= 0 or >= vocab keeps everything; so do top_p == 1 and min_p == 0.
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        trunc = [i for i in range(len(params))
                 if top_ks[i] < vocab_size or top_ps[i] < 1.0 or min_ps[i] > 0.0]
        if trunc:
            scores = truncate(scores, trunc, [top_ks[i] for i in trunc],
                              [top_ps[i] for i in trunc], [min_ps[i] for i in trunc])

        u = seeded_uniforms(seeds, output_indices, vocab_size, device)  # (n, V)
        gumbel = -torch.log(-torch.log(u))
        # Excluded tokens are -inf and stay -inf; the top token always survives, so the
        # argmax is a kept token.
        return torch.argmax(scores + gumbel, dim=-1)
