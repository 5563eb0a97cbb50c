"""CUDA graphs for pure-decode steps.

A decode step of a small model is dominated by kernel launch overhead (a few hundred launches of
microsecond kernels), so the forward is captured once per padded batch size at start-up and
replayed. A graph replays fixed pointers and fixed launch sizes, hence:

  * persistent device buffers hold every input; a step copies its inputs into them (from pinned
    host staging, non_blocking) and replays the graph of the smallest captured size >= its batch;
  * the rows past the real batch are padding that must be harmless: token 0 at position 0,
    seq_len 1 (so attention reads one key), block-table row of zeros (block 0 is a real block,
    reading it is safe), slot -1 (the K/V store skips negative slots, so nothing is written);
  * launch sizes come from Python ints frozen at capture: max_query_len = 1 and
    max_seq_len = max_model_len (the Triton backend's split-KV heuristic then still splits long
    contexts; splits past a short sequence's end return at once).

Only steps in which every scheduled span is exactly one token qualify (decode, or the last prompt
token after a prefix hit: the forward is the same); anything else, or a batch larger than the
largest captured size, runs eagerly. Sampling stays eager: the graph returns hidden states.

Buffer layout (device; the pinned host staging mirrors the first two):
    ints:         (4 * max_bs,) int64. For a graph of size bs the four fields sit back to back,
                  [input_ids | positions | slot_mapping | seq_lens] each bs long, so one step is
                  one contiguous host->device copy. Each graph captured views at its own offsets.
    bt_stage:     (max_bs * max_blocks,) int32, the step's block tables as a compact (bs, width)
                  array; copied on the device into block_tables[:bs, :width] (width varies per
                  step, which a graph cannot express, so this copy is outside the graph).
    seq_lens:     (max_bs,) int32, cast from the int64 field inside the graph.
    query_start_loc: (max_bs + 1,) int32 = arange (one token per sequence), never rewritten.
    block_tables: (max_bs, max_blocks) int32. Columns past a step's width keep stale block ids
                  from earlier steps; they are never read because they lie past seq_len.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from typing import Optional, Sequence

import torch

from llmbatch.runtime.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512
_NUM_INT_FIELDS = 4  # input_ids, positions, slot_mapping, seq_lens


def capture_batch_sizes(max_num_seqs: int, cap: int = MAX_CAPTURE_SIZE) -> list[int]:
    """Ascending padded sizes: 1, 2, 4, then multiples of 8 up to 256, of 16 beyond, and the
    limit min(max_num_seqs, cap) itself so a full batch never falls back to eager.

    Padding costs little at large batch (the step reads the weights once either way), so the
    grid coarsens as sizes grow; each size costs one capture at start-up.
    """
    if max_num_seqs < 1 or cap < 1:
        raise ValueError(f"max_num_seqs and cap must be >= 1, got {max_num_seqs} and {cap}")
    limit = min(max_num_seqs, cap)
    sizes = {s for s in (1, 2, 4) if s <= limit}
    sizes.update(range(8, min(limit, 256) + 1, 8))
    sizes.update(range(272, limit + 1, 16))
    sizes.add(limit)
    return sorted(sizes)


def padded_batch_size(num_seqs: int, sizes: Sequence[int]) -> Optional[int]:
    """Smallest captured size >= num_seqs (sizes ascending), or None when none is large enough."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def decode_batch_size(step) -> Optional[int]:
    """Number of sequences when `step` (a StepInputs) is pure decode, else None.

    Pure decode: every span is exactly one token, i.e. num_tokens == num_seqs (spans are never
    empty). A span carrying speculative tokens is longer than one token, so it never qualifies.
    """
    num_seqs = len(step.seq_lens)
    if num_seqs == 0 or len(step.input_ids) != num_seqs:
        return None
    return num_seqs


def fill_decode_inputs(host_ints: torch.Tensor, host_block_tables: torch.Tensor,
                       input_ids: list[int], positions: list[int], slot_mapping: list[int],
                       seq_lens: list[int], block_tables: list[list[int]],
                       padded_size: int) -> int:
    """Write one decode step, padded to `padded_size` rows, into the flat host staging buffers.

    host_ints: (>= 4 * padded_size,) int64 -> [ids | positions | slots | seq_lens], padded_size
        each; padding rows get id 0, position 0, slot -1, seq_len 1.
    host_block_tables: (>= padded_size * width,) int32 -> a compact (padded_size, width) array,
        ragged tables right-padded with 0, padding rows all 0.
    Returns width = the longest block table (at least 1). Works on any CPU tensor (pinned or not).
    """
    n, bs = len(input_ids), padded_size
    if not (len(positions) == len(slot_mapping) == len(seq_lens) == len(block_tables) == n):
        raise ValueError("decode inputs must all have one entry per sequence")
    if n > bs:
        raise ValueError(f"{n} sequences do not fit a padded batch of {bs}")
    width = max((len(t) for t in block_tables), default=1) or 1
    if host_ints.numel() < _NUM_INT_FIELDS * bs or host_block_tables.numel() < bs * width:
        raise ValueError(f"staging buffers too small for a batch of {bs} x {width} blocks")
    # Written through numpy views of the (pinned) staging: ~3x cheaper than building tensors
    # from Python lists, which matters at a few hundred sequences per step.
    ints = host_ints[:_NUM_INT_FIELDS * bs].numpy()
    for field, (values, pad_value) in enumerate(((input_ids, 0), (positions, 0),
                                                 (slot_mapping, -1), (seq_lens, 1))):
        ints[field * bs:field * bs + n] = values
        ints[field * bs + n:(field + 1) * bs] = pad_value
    rows = host_block_tables[:bs * width].numpy().reshape(bs, width)
    rows[:] = 0
    for i, table in enumerate(block_tables):
        rows[i, :len(table)] = table
    return width


class DecodeGraphRunner:
    """Captures the model's decode forward at padded batch sizes; replays it for decode steps.

    Build after the KV pool exists (the graphs bake in the cache pointers) and never reallocate
    the pool afterwards. CUDA only; the attention backend must take negative slots as "skip"
    and size its launches from AttentionMetadata's Python ints (the Triton backend does).
    """

    def __init__(self, model, kv_caches, attn_backend, *, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device,
                 batch_sizes: Optional[Sequence[int]] = None, capture: bool = True) -> None:
        """capture=False builds the buffers only (on any device): tests drive _stage and
        _forward eagerly on CPU to check the padding logic without CUDA."""
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = sorted(set(batch_sizes)) if batch_sizes else capture_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.num_replays = 0
        self.replays_by_size: collections.Counter[int] = collections.Counter()

        mb, nb = self.max_bs, self.max_blocks
        i32, i64 = torch.int32, torch.int64
        self._ints = torch.zeros(_NUM_INT_FIELDS * mb, dtype=i64, device=device)
        self._bt_stage = torch.zeros(mb * nb, dtype=i32, device=device)
        self._seq_lens = torch.ones(mb, dtype=i32, device=device)
        self._query_start_loc = torch.arange(mb + 1, dtype=i32, device=device)
        self._block_tables = torch.zeros(mb, nb, dtype=i32, device=device)
        on_cuda = device.type == "cuda"
        self._host_ints = torch.zeros(_NUM_INT_FIELDS * mb, dtype=i64, pin_memory=on_cuda)
        self._host_bt = torch.zeros(mb * nb, dtype=i32, pin_memory=on_cuda)
        # Recorded after each step's copies: the pinned staging is rewritten only once the
        # previous step's non_blocking copies have read it.
        self._copy_done = torch.cuda.Event() if on_cuda else None
        self._copy_pending = False
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bs -> (bs, hidden_size), graph-owned
        if capture:
            self.capture()

    # ------------------------------------------------------------------ capture

    def _forward(self, bs: int) -> torch.Tensor:
        """The captured body: the model over the first bs rows of the persistent buffers."""
        ints = self._ints
        self._seq_lens[:bs].copy_(ints[3 * bs:4 * bs])  # int64 -> int32, part of the graph
        meta = AttentionMetadata(
            slot_mapping=ints[2 * bs:3 * bs],
            query_start_loc=self._query_start_loc[:bs + 1],
            seq_lens=self._seq_lens[:bs],
            block_tables=self._block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=None,  # unknown at capture; the Triton backend does not read it
        )
        return self.model(ints[:bs], ints[bs:2 * bs], self.kv_caches, meta, self.attn_backend)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool (the smaller graphs
        reuse the largest one's activation memory)."""
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for bs in reversed(self.sizes):
                # All-padding inputs: the warm-up forward writes no K/V (slot -1 everywhere).
                self._stage([], [], [], [], [], bs)
                torch.cuda.synchronize()
                self._forward(bs)  # warm-up outside the graph: Triton compiles, cuBLAS picks
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: a monitor thread touching CUDA must not break the capture.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = self._forward(bs)
                self._graphs[bs] = graph
                self._outputs[bs] = out
            torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
                    len(self.sizes), self.sizes[0], self.max_bs, time.perf_counter() - start)

    # ------------------------------------------------------------------ replay

    def _stage(self, input_ids, positions, slot_mapping, seq_lens, block_tables,
               bs: int) -> None:
        """Fill the pinned staging for a batch padded to bs and enqueue the device copies."""
        if self._copy_pending and self._copy_done is not None:
            self._copy_done.synchronize()  # normally long done: the last step synced on sampling
        width = fill_decode_inputs(self._host_ints, self._host_bt, input_ids, positions,
                                   slot_mapping, seq_lens, block_tables, bs)
        n_ints = _NUM_INT_FIELDS * bs
        self._ints[:n_ints].copy_(self._host_ints[:n_ints], non_blocking=True)
        self._bt_stage[:bs * width].copy_(self._host_bt[:bs * width], non_blocking=True)
        self._block_tables[:bs, :width].copy_(self._bt_stage[:bs * width].view(bs, width))
        if self._copy_done is not None:
            self._copy_done.record()
            self._copy_pending = True

    def padded_size_for(self, step) -> Optional[int]:
        """The captured size a step (StepInputs) would replay at, or None to run it eagerly."""
        n = decode_batch_size(step)
        if n is None:
            return None
        bs = padded_batch_size(n, self.sizes)
        if bs is None or max(len(t) for t in step.block_tables) > self.max_blocks:
            return None  # a table wider than max_model_len allows (lookahead): stay eager
        return bs

    def run(self, step) -> Optional[torch.Tensor]:
        """Replay for a qualifying step: (num_seqs, hidden_size) hidden states of the real rows,
        a view into graph-owned memory valid until the next replay. None: run it eagerly."""
        bs = self.padded_size_for(step)
        if bs is None:
            return None
        self._stage(step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                    step.block_tables, bs)
        self._graphs[bs].replay()
        self.num_replays += 1
        self.replays_by_size[bs] += 1
        return self._outputs[bs][:len(step.seq_lens)]
