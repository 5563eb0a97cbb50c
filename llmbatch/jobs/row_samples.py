"""The n samples of each input row (`sampling.n`, vLLM's n): request ids, seeds, and the
gathering of the n results into the row's n output rows (no torch).

An input row becomes n engine requests with the same prompt. Request ids are
`row_index * n + sample_index`, so a result maps back to its row without a lookup table, and
with n == 1 the ids are the row indices, as before `n` existed. The planner's prefix grouping
(runtime/planner.py) makes samples 1..n-1 followers of sample 0: they wait for its prompt
blocks and hit them in the prefix cache instead of computing the prompt n times.

Seeds: sample 0 keeps the row's seed (so raising n adds samples and leaves the first one as it
was); sample j > 0 samples with derive_seed(row seed, j), which depends only on the row's
seed, never on batch, shard or resume.

A row is finished when all n of its samples are: the committer receives its n output rows at
once, in sample order. Every input row has exactly n output rows, error rows included (a row
refused before the engine gets n copies of its error row), so (id, sample_index) is a key.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from llmbatch.runtime.seed_mixing import derive_seed


class DuplicateSample(Exception):
    """The engine returned a result for a sample that already has one."""


class RowSamples:
    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        # row index -> (the input part of its output rows, one slot per sample: None until
        # that sample's result arrives)
        self._pending: dict[int, tuple[dict, list[Optional[dict]]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def requests(self, row_index: int, row: dict, token_ids: list[int], params,
                 make_request: Callable) -> list:
        """Register `row` (kept columns and id) as in flight; its n requests, sample order.
        make_request(request_id, token_ids, params) builds one (runtime.request.Request)."""
        self._pending[row_index] = (row, [None] * self.n)
        base = row_index * self.n
        return [make_request(base + j, token_ids, self.sample_params(params, j))
                for j in range(self.n)]

    @staticmethod
    def sample_params(params, sample_index: int):
        """The row's SamplingParams for sample `sample_index`: its own seed, and no
        prompt_logprobs (the prompt's scores are sample 0's, copied to the others by
        add_result: scoring takes no prefix-cache hit, so each sample would compute the whole
        prompt again for the same column)."""
        if sample_index == 0:
            return params
        return dataclasses.replace(params, seed=derive_seed(params.seed, sample_index),
                                   prompt_logprobs=None)

    def row_of(self, request_id) -> Optional[dict]:
        """The input part of the request's row, or None when no row in flight has that id."""
        if not isinstance(request_id, int) or request_id < 0:
            return None
        entry = self._pending.get(request_id // self.n)
        return entry[0] if entry is not None else None

    def add_result(self, request_id: int, fill: Callable[[dict], dict]
                   ) -> Optional[tuple[int, list[dict]]]:
        """Record one sample: fill(copy of the row) completes its output row. Returns
        (row index, its n output rows) when this was the row's last sample, else None.
        The id must be in flight (row_of); DuplicateSample for a sample that arrived twice.
        Whatever `fill` raises passes through (it is not a duplicate)."""
        row_index, sample_index = divmod(request_id, self.n)
        row, slots = self._pending[row_index]
        if slots[sample_index] is not None:
            raise DuplicateSample(request_id)
        slots[sample_index] = fill(self.with_index(row, sample_index))
        if any(s is None for s in slots):
            return None
        del self._pending[row_index]
        if "prompt_logprobs" in slots[0]:          # one prompt, one score (sample_params)
            for other in slots[1:]:
                other["prompt_logprobs"] = slots[0]["prompt_logprobs"]
        return row_index, slots

    def expand(self, row: dict) -> list[dict]:
        """n copies of a finished row (an error row that never reached the engine)."""
        return [self.with_index(row, j) for j in range(self.n)]

    def with_index(self, row: dict, sample_index: int) -> dict:
        """A shallow copy (samples share the kept input values, which nothing mutates), with
        its sample_index when n > 1. At n == 1 the output has no sample_index column, and a
        kept input column may carry that name: it must keep its values."""
        return dict(row, sample_index=sample_index) if self.n > 1 else dict(row)
