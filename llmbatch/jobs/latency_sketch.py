"""Bounded-memory mean and percentiles of per-row latencies (TTFT, TPOT) for a shard.

Exact while a shard has at most `exact_limit` samples (small jobs and tests get exact
percentiles); beyond that the samples move into a histogram with log-spaced buckets, each
1 % wide, so a percentile is off by at most ~0.5 % relative and memory stays a few thousand
buckets however many millions of rows the shard has. The mean is always exact.
"""

from __future__ import annotations

import math
from typing import Optional

_BUCKET_GROWTH = 1.01          # bucket i covers [FLOOR * 1.01**i, FLOOR * 1.01**(i+1))
_FLOOR_S = 1e-7                # values below (including 0) share bucket -1


def _bucket(value: float) -> int:
    if value < _FLOOR_S:
        return -1
    return int(math.log(value / _FLOOR_S) / math.log(_BUCKET_GROWTH))


def _bucket_value(index: int) -> float:
    """Geometric middle of a bucket."""
    if index < 0:
        return 0.0
    return _FLOOR_S * _BUCKET_GROWTH ** (index + 0.5)


def exact_percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolated q-th percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class LatencySketch:
    def __init__(self, exact_limit: int = 10_000) -> None:
        self.exact_limit = exact_limit
        self.count = 0
        self.total = 0.0
        self._exact: Optional[list[float]] = []
        self._buckets: dict[int, int] = {}

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if self._exact is not None:
            self._exact.append(value)
            if len(self._exact) > self.exact_limit:
                for v in self._exact:
                    self._add_bucket(v)
                self._exact = None
        else:
            self._add_bucket(value)

    def _add_bucket(self, value: float) -> None:
        index = _bucket(value)
        self._buckets[index] = self._buckets.get(index, 0) + 1

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None

    def percentile(self, q: float) -> Optional[float]:
        if self._exact is not None:
            return exact_percentile(self._exact, q)
        # Nearest rank over the histogram: the bucket holding the ceil(q% * n)-th value.
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return _bucket_value(index)
        return None  # unreachable: counts sum to self.count
