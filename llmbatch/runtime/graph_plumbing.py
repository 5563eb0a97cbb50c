"""What the decode / verify graphs (cuda_graphs.py) and the one-sequence prefill graphs
(prefill_graphs.py) share: the fence guarding their pinned staging, the writing of per-token
fields into it, the eager warm-up then capture, and the check of a graph's first replay
against the eager forward."""

from __future__ import annotations

import torch


class StagingFence:
    """Guards pinned host staging that non_blocking copies read: wait() before rewriting it
    (the previous step's copies must have read it), copied() after enqueuing its copies.
    No-op off CUDA. Shared by the decode and the prefill graphs (prefill_graphs.py)."""

    def __init__(self, on_cuda: bool) -> None:
        self._event = torch.cuda.Event() if on_cuda else None
        self._pending = False

    def wait(self) -> None:
        if self._pending:
            self._event.synchronize()   # normally long done: the last step synced on sampling

    def copied(self) -> None:
        if self._event is not None:
            self._event.record()
            self._pending = True


def fill_token_fields(ints, fields, n: int, padded: int) -> None:
    """Write per-token fields back to back into `ints` (a numpy view of the staging), each
    `padded` long: a field's n real values, then its padding value. fields: (values, pad)."""
    for i, (values, pad_value) in enumerate(fields):
        ints[i * padded:i * padded + n] = values
        ints[i * padded + n:(i + 1) * padded] = pad_value


def capture_after_warm_up(forward, pool) -> tuple:
    """(graph, its output, the eager output) of `forward()` (no arguments, over persistent
    buffers already staged): one eager warm-up first (Triton compiles, cuBLAS picks; its
    output is what the first replay is checked against), then the capture into `pool`.
    forward may return a tensor or a tuple of tensors (the eager output is then a tuple of
    clones)."""
    torch.cuda.synchronize()
    eager = forward()
    eager = (tuple(t.clone() for t in eager) if isinstance(eager, tuple) else eager.clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a monitor thread touching CUDA must not break the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()
    return graph, out, eager


def check_replay_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """A graph's first replay against the eager forward on the same inputs: the tolerance
    admits another kernel choice inside the graph, not garbage (NaN where eager has none, a
    kernel that did not survive capture). Raises RuntimeError naming `what`."""
    got, want = got.float(), want.float()
    if not torch.allclose(got, want, atol=3e-2, rtol=3e-2, equal_nan=True):
        diff = (got - want).abs().nan_to_num(float("inf")).max().item()
        raise RuntimeError(f"{what} differs from the eager forward by {diff:.3g}")
