"""Greedy argmax of a logits matrix, the same index as torch.argmax(dim=-1) on every path.

sampler.py takes every greedy token from here, and graph_logits.py captures it inside the decode
graphs. For few rows over a large vocabulary on CUDA, a one-pass torch.argmax leaves most of
the GPU idle, so it runs in two stages (chunk maxima, then the first chunk holding the overall
max), as two Triton launches (triton_argmax.py) while TRITON_ARGMAX is set (the model runner
turns it off for the process if its self-check fails on this GPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


# Rows at most this many get the two-stage argmax (few rows leave the GPU nearly idle in a
# one-pass reduction over 128k logits: 27 us a step at batch 1 on an H200).
_TWO_STAGE_MAX_ROWS = 16
_TWO_STAGE_MIN_VOCAB = 16384
# The two stages as two Triton launches (triton_argmax.py) instead of ~5 torch ones, on CUDA.
# Since stop 10, not yet measured (bench_batch1's "argmax in torch" row is the A/B).
TRITON_ARGMAX = True


@functools.lru_cache(maxsize=None)
def _argmax_chunk(vocab: int) -> int:
    """A chunk width near 1024 that divides the vocabulary (no padding copy), else 1024 (the
    tail is padded with -inf). 128256 (Llama 3) -> 1002."""
    for delta in range(0, 512):
        for c in (1024 - delta, 1024 + delta):
            if vocab % c == 0:
                return c
    return 1024


def greedy_argmax(logits: torch.Tensor, two_stage: Optional[bool] = None,
                  use_triton: Optional[bool] = None) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for (rows, vocab) logits, the same index in every case
    (first maximum; a NaN counts as the maximum, the first NaN wins, as in torch.argmax).

    For few rows over a large vocabulary, two stages: the max of each chunk of C columns
    (many parallel reductions), then the first chunk holding the overall max. Both stages take
    the first occurrence, so the result is the overall first occurrence. two_stage: None
    chooses (CUDA, few rows, large vocabulary); tests force it either way. use_triton: the two
    stages as Triton kernels (triton_argmax.py); None: on CUDA when TRITON_ARGMAX is set."""
    rows, vocab = logits.shape
    if two_stage is None:
        two_stage = (logits.is_cuda and rows <= _TWO_STAGE_MAX_ROWS
                     and vocab >= _TWO_STAGE_MIN_VOCAB)
    if not two_stage:
        return torch.argmax(logits, dim=-1)
    if use_triton is None:
        use_triton = TRITON_ARGMAX and logits.is_cuda
    if use_triton and rows and vocab:
        from llmbatch.runtime.triton_argmax import triton_argmax

        return triton_argmax(logits)
    chunk = _argmax_chunk(vocab)
    pad = (-vocab) % chunk
    x = logits if not pad else torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
    # reshape, not view: logits may be strided (the TP head slices off padding columns) and
    # may have no rows, where view's -1 is ambiguous.
    x = x.reshape(rows, x.shape[1] // chunk, chunk)
    chunk_max, chunk_arg = x.max(dim=-1)                            # (rows, num_chunks)
    best = torch.argmax(chunk_max, dim=-1)                          # first chunk with the max
    return best * chunk + chunk_arg.gather(1, best[:, None]).squeeze(1)
