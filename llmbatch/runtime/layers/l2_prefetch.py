"""Read a weight into the GPU's L2 cache on a side stream, ahead of the matmul that needs it
(EngineConfig.l2_prefetch, opt-in; models/llama_prefetch.py decides what and when).

Why: at batch 1 the small matmuls of a decoder layer run far below the card's bandwidth (H200,
stop 9's W-BATCH1 profile: qkv 12.6 MB and o_proj 8.4 MB in 5.9 us each, 1.4-2.1 TB/s, against
~4.3 TB/s for the large gate_up), while rotary, attention and the norms between them leave HBM
nearly idle for ~10 us a layer. Touching the next matmul's weight during that window turns its
HBM reads into L2 hits. Whether it pays is measured by bench (`--l2-prefetch`, system
llmbatch-l2prefetch); nothing here is on by default.

The kernel loads the weight as 32-bit words with the evict_last policy (keep these lines over
streaming ones). A load whose value is never used would be removed by the compiler, so every
program stores one flag: 1 if any of its words equals `sentinel`. The flags land in a scratch
buffer nobody reads (the tests read it to prove every word was loaded). The model's tensors are
never written, so outputs are bit-identical with the prefetch on or off.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from llmbatch.runtime.fp_fusion import FP_FUSION

# Words one program loads per loop iteration (16 KiB); 4 warps -> 32 words (128 B) a thread.
BLOCK_WORDS = 4096
# At most this many programs (2 per SM on an H200's 132 SMs): enough loads in flight to pull
# an 8-13 MB weight at full bandwidth, few enough to leave SMs to the attention kernels.
MAX_PROGRAMS = 264
# Any fixed int32; a weight word equal to it only sets a flag in the scratch buffer.
SENTINEL = 0x7F7F7F7F


@triton.jit
def _l2_touch_kernel(src_ptr, n_words, flags_ptr, sentinel, iters, BLOCK: tl.constexpr):
    # Program p loads blocks p, p + P, p + 2P, ... (P = number of programs): at every moment
    # the programs read neighbouring blocks, so DRAM pages are read in order.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, iters):
        idx = (i * num_programs + pid).to(tl.int64) * BLOCK + offs
        words = tl.load(src_ptr + idx, mask=idx < n_words, other=0,
                        eviction_policy="evict_last")
        found = tl.maximum(found, (words == sentinel).to(tl.int32))
    tl.store(flags_ptr + pid, tl.max(found, axis=0))


def prefetch_words(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """`weight` as a flat int32 view (the same memory), or None when it has none: not
    contiguous, or its byte size is not a multiple of 4."""
    if not weight.is_contiguous() or weight.numel() * weight.element_size() % 4:
        return None
    try:
        return weight.detach().reshape(-1).view(torch.uint8).view(torch.int32)
    except RuntimeError:   # a storage offset that is not 4-byte aligned
        return None


def grid_size(n_words: int, max_programs: Optional[int] = None) -> tuple[int, int]:
    """(programs, loop iterations per program) covering n_words >= 1 in BLOCK_WORDS blocks,
    with at most max_programs (default MAX_PROGRAMS) programs."""
    blocks = triton.cdiv(n_words, BLOCK_WORDS)
    programs = min(blocks, max_programs or MAX_PROGRAMS)
    return programs, triton.cdiv(blocks, programs)


def l2_touch(words: torch.Tensor, flags: torch.Tensor) -> None:
    """Load every word of `words` (flat int32, from prefetch_words) once; flags (int32, at
    least as long as the grid) gets 1 at [p] if program p met SENTINEL, else 0."""
    n = words.numel()
    if n == 0:
        return
    programs, iters = grid_size(n)
    if flags.numel() < programs:
        raise ValueError(f"flags holds {flags.numel()} entries, the grid has {programs}")
    _l2_touch_kernel[(programs,)](words, n, flags, SENTINEL, iters, BLOCK=BLOCK_WORDS,
                                  num_warps=4, **FP_FUSION)


class L2Prefetcher:
    """Issues l2_touch on its own CUDA stream, forked from the current stream at the point of
    the call: the touch starts once the work queued so far (e.g. the qkv matmul) is done and
    runs beside what is queued next (rotary, attention). join() must be called before the
    forward returns: under CUDA graph capture every forked stream has to rejoin the capturing
    one. Weights are read only, so the model never waits on a touch except at that join."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.flags = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)
        self._forked = False

    def issue(self, words: torch.Tensor) -> None:
        """Touch `words` (flat int32 view of a weight) on the side stream."""
        if self.stream is None:       # CPU (tests): run inline, nothing to overlap
            l2_touch(words, self.flags)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            l2_touch(words, self.flags)
        self._forked = True

    def join(self) -> None:
        """The current stream waits for every touch issued so far."""
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._forked = False
