"""Greedy argmax over a large vocabulary in two Triton launches (greedy_argmax.py's path for
few rows on CUDA).

torch.argmax over one row of 128k logits runs as a one-pass reduction that leaves the GPU
idle (27 us on an H200); its two-stage torch form (chunk max, argmax of the maxima, gather,
index arithmetic) is ~5 launches, ~17 us a batch-1 step in stop 9's profile. Here:

    stage 1   grid (rows, chunks): each program takes CHUNK columns of one row and writes the
              chunk's value and first index of its maximum
    stage 2   grid (rows,): the first chunk holding the row's maximum gives the index

Semantics are torch.argmax's exactly: the first occurrence of the maximum; a NaN counts as
the maximum and the first NaN wins; -0.0 equals 0.0. Each stage takes the first occurrence
within what it sees, and chunks are in column order, so the result is the overall first
occurrence. Comparisons are in the logits' own dtype promoted to float32 (exact).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime.fp_fusion import FP_FUSION

CHUNK = 1024


@triton.jit
def _first_max(x, idx):
    """(value, index) of the first maximum of x (float32 block), NaN the largest: the first
    NaN wins. idx: each element's index (int32); masked-out lanes hold -inf."""
    is_nan = x != x
    first_nan = tl.min(tl.where(is_nan, idx, 2147483647), axis=0)
    m = tl.max(tl.where(is_nan, float("-inf"), x), axis=0)
    first_m = tl.min(tl.where(x == m, idx, 2147483647), axis=0)
    has_nan = first_nan < 2147483647
    return tl.where(has_nan, float("nan"), m), tl.where(has_nan, first_nan, first_m)


@triton.jit
def _chunk_argmax_kernel(logits_ptr, row_stride, vocab, val_ptr, idx_ptr, num_chunks,
                         CHUNK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=cols < vocab,
                other=float("-inf")).to(tl.float32)
    v, i = _first_max(x, cols)
    tl.store(val_ptr + row * num_chunks + c, v)
    tl.store(idx_ptr + row * num_chunks + c, i)


@triton.jit
def _pick_chunk_kernel(val_ptr, idx_ptr, num_chunks, out_ptr, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS_PAD)
    valid = offs < num_chunks
    v = tl.load(val_ptr + row * num_chunks + offs, mask=valid, other=float("-inf"))
    # Chunk order is column order: the first chunk holding the maximum (or a NaN) wins.
    _, best = _first_max(v, tl.where(valid, offs, 2147483647))
    tl.store(out_ptr + row, tl.load(idx_ptr + row * num_chunks + best).to(tl.int64))


def triton_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for (rows, vocab) logits with a unit column stride ->
    (rows,) int64, in two launches (no host sync)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if vocab == 0:
        raise ValueError("argmax of an empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(rows, num_chunks)](logits, logits.stride(0), vocab, vals, idxs,
                                             num_chunks, CHUNK=CHUNK, num_warps=4, **FP_FUSION)
    _pick_chunk_kernel[(rows,)](vals, idxs, num_chunks, out,
                                CHUNKS_PAD=triton.next_power_of_2(num_chunks), num_warps=4,
                                **FP_FUSION)
    return out


def self_check(device: torch.device, vocab: int = 128256, dtype: torch.dtype = torch.float32
               ) -> Optional[str]:
    """None when triton_argmax equals torch.argmax on `device` for a few hard cases (1 and 16
    rows, ties inside and across chunks, a NaN, a row of -inf), else why not. ModelRunner runs
    it once at start-up on CUDA, before any graph is captured: the kernel never ran on a GPU
    before it became the default there (stop 10), and a wrong argmax would silently change
    every greedy token, so a failure turns the Triton path off (greedy_argmax.TRITON_ARGMAX) instead
    of failing the job."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for rows in (1, 16):
        x = torch.randn(rows, vocab, generator=gen)
        x[0, vocab - 3] = x[0, 5] = 20.0                      # a tie across chunks: 5 wins
        if rows > 1:
            x[1, vocab // 2] = float("nan")                     # the first NaN wins
            x[2] = float("-inf")                                # all -inf: index 0
            x[3] = x[3].round()                                 # ties inside chunks
        x = x.to(device=device, dtype=dtype)
        try:
            got = triton_argmax(x)
        except Exception as exc:  # a compile or launch failure on this GPU
            return f"{rows} rows: {type(exc).__name__}: {exc}"
        want = torch.argmax(x, dim=-1)
        if not torch.equal(got, want):
            bad = (got != want).nonzero().flatten().tolist()
            return (f"{rows} rows of {vocab} {str(dtype).replace('torch.', '')} logits: rows "
                    f"{bad[:4]} differ from torch.argmax")
    return None

