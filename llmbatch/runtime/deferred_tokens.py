"""The previous step's sampled tokens, written over a step's placeholder input ids on the
device (async scheduling, docs/async_scheduling.md): the host has not seen them yet.

StepInputs.deferred_rows[j] (a row of this step) takes the token the step in flight sampled at
its row deferred_src[j]. In a steady decode step both lists are the same contiguous run (every
request decodes, in the order the previous step sampled them), and then the write is one
device-to-device slice copy. Otherwise (a request admitted, stopped or reordered in between)
the two index lists go to the device in one host-to-device copy and the write is an
index_select then an index_copy_. Why the run is worth a fast path: at batch 1 the index path
was 3 device operations between two decode graph replays (a pinned upload, a gather, a
scatter) and ~60 us of host time a step under the profiler (bench/RESULTS.md, stop 20's
batch-1 profile); the slice path is 1 operation and no upload.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def _run_start(values: list[int]) -> Optional[int]:
    """values[0] when values is the run values[0], values[0] + 1, ..., else None."""
    first = values[0]
    if values[-1] - first != len(values) - 1:
        return None
    # A strictly increasing list (step rows) needs only the endpoints; sample ranks need
    # the whole comparison (list == range compares in C).
    return first if values == list(range(first, first + len(values))) else None


class DeferredTokens:
    """Where this step's deferred input ids come from; write_into() writes them."""

    def __init__(self, rows: torch.Tensor | None, tokens: torch.Tensor,
                 first_row: int) -> None:
        # Slice form: rows is None, tokens are the values of rows first_row .. + len(tokens).
        # Index form: rows (device, int64) are the rows to write, tokens their values.
        self._rows, self._tokens, self._first_row = rows, tokens, first_row

    @property
    def is_slice(self) -> bool:
        return self._rows is None

    @classmethod
    def build(cls, rows: list[int], src: list[int], prev_tokens: torch.Tensor,
              upload: Callable[[list[int], torch.dtype], torch.Tensor]) -> "DeferredTokens":
        """rows: this step's rows with a placeholder id (increasing); src: the rows of
        prev_tokens (the step in flight's sampled ids, device) they take. upload(list, dtype)
        puts a host list on the device (ModelRunner._h2d); only the index form calls it."""
        if len(rows) != len(src) or not rows:
            raise ValueError(f"deferred rows and their sources must pair up, got {len(rows)} "
                             f"rows and {len(src)} sources")
        if min(src) < 0 or max(src) >= prev_tokens.shape[0]:   # min / max scan in C
            raise ValueError(f"deferred sources {min(src)}..{max(src)} outside the step in "
                             f"flight's {prev_tokens.shape[0]} sampled rows")
        first_row, first_src = _run_start(rows), _run_start(src)
        if first_row is not None and first_src is not None:
            return cls(None, prev_tokens[first_src:first_src + len(src)], first_row)
        # One small copy holds both index lists: rows of this step, rows of prev_tokens.
        idx = upload(rows + src, torch.long)
        n = len(rows)
        return cls(idx[:n], prev_tokens.index_select(0, idx[n:]), 0)

    def write_into(self, input_ids: torch.Tensor) -> None:
        """Write the deferred ids into input_ids (the step's ids, on the device; a graph's
        persistent buffer or the eager step's tensor), in stream order."""
        if self._rows is None:
            input_ids[self._first_row:self._first_row + self._tokens.shape[0]].copy_(
                self._tokens)
        else:
            input_ids.index_copy_(0, self._rows, self._tokens)
