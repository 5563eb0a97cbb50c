"""CUDA graphs for pure-decode steps and for speculative verify steps.

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

A step qualifies when every scheduled span has the same length q and a graph of that q exists:
q = 1 (decode, or the last prompt token after a prefix hit: the forward is the same) at every
captured batch size, and q = k + 1 (a speculative verify step: the last sampled token plus k
drafts per sequence) at the sizes up to the engine's speculative_max_num_seqs, when asked for.
Anything else (prefill chunks, a verify step with fewer drafts for some sequence, a batch larger
than the largest captured size) runs eagerly. The graph returns hidden states, q rows per
sequence; graphs of at most logits_max_rows tokens also compute the logits and their greedy
argmax (graph_logits.py). Sampling stays eager.

Buffer layout (device; the pinned host staging mirrors the first two):
    ints:         int64, long enough for the largest graph. For a graph of (bs, q), n = bs * q
                  tokens, the four fields sit back to back, [input_ids n | positions n |
                  slot_mapping n | seq_lens bs], so one step is one contiguous host->device
                  copy. Each graph captured views at its own offsets.
    bt_stage:     (max_bs * max_blocks,) int32, the step's block tables as a compact (bs, width)
                  array; copied on the device into block_tables[:bs, :width] (width varies per
                  step, which a graph cannot express, so this copy is outside the graph).
                  Both copies are skipped when the tables are the last step's (staged_tables.py).
    seq_lens:     (max_bs,) int32, cast from the int64 field inside the graph.
    query_start_loc: one per q, (max_bs + 1,) int32 = arange * q, never rewritten.
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
from llmbatch.runtime.graph_logits import GraphStep, check_tail, logits_tail
from llmbatch.runtime.graph_plumbing import (StagingFence, capture_after_warm_up,
                                             check_replay_close, fill_token_fields)
from llmbatch.runtime.staged_tables import StagedTables
from llmbatch.runtime.step_inputs import fill_block_tables

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512


def _ints_len(bs: int, q: int) -> int:
    """int64 elements of one (bs, q) step: three per-token fields and one per-sequence field."""
    return 3 * bs * q + bs


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


def uniform_span_len(step) -> Optional[tuple[int, int]]:
    """(num_seqs, q) when every span of `step` (a StepInputs) is exactly q tokens, else None."""
    num_seqs, num_tokens = len(step.seq_lens), len(step.input_ids)
    if num_seqs == 0 or num_tokens % num_seqs:
        return None
    q = num_tokens // num_seqs
    if q > 1:  # q == 1 needs no check: spans are never empty
        starts = step.query_start_loc
        if any(starts[i + 1] - starts[i] != q for i in range(num_seqs)):
            return None
    return num_seqs, q


def fill_decode_inputs(host_ints: torch.Tensor, host_block_tables: torch.Tensor,
                       input_ids: list[int], positions: list[int], slot_mapping: list[int],
                       seq_lens: list[int], block_tables: list[list[int]],
                       padded_size: int, tokens_per_seq: int = 1) -> int:
    """Write one step of spans of q = tokens_per_seq tokens each, padded to `padded_size`
    sequences, into the flat host staging buffers.

    host_ints: (>= 3 * padded_size * q + padded_size,) int64 -> [ids | positions | slots]
        padded_size * q each, then seq_lens padded_size; padding tokens get id 0, position 0,
        slot -1 (never stored), padding sequences seq_len q (their span is their whole context).
    host_block_tables: (>= padded_size * width,) int32 -> a compact (padded_size, width) array,
        ragged tables right-padded with 0, padding rows all 0.
    Returns width = the longest block table (at least 1). Works on any CPU tensor (pinned or not).
    """
    q, bs = tokens_per_seq, padded_size
    n = len(seq_lens)
    if not (len(input_ids) == len(positions) == len(slot_mapping) == n * q
            and len(block_tables) == n):
        raise ValueError(f"step inputs must have {q} token(s) per sequence and one block table "
                         f"and seq_len per sequence")
    if n > bs:
        raise ValueError(f"{n} sequences do not fit a padded batch of {bs}")
    width = max((len(t) for t in block_tables), default=1) or 1
    if host_ints.numel() < _ints_len(bs, q) or host_block_tables.numel() < bs * width:
        raise ValueError(f"staging buffers too small for a batch of {bs} x {width} blocks")
    # Written through numpy views of the (pinned) staging: ~3x cheaper than building tensors
    # from Python lists, which matters at a few hundred sequences per step.
    ints = host_ints[:_ints_len(bs, q)].numpy()
    nt, bt = n * q, bs * q   # real and padded token counts
    fill_token_fields(ints, ((input_ids, 0), (positions, 0), (slot_mapping, -1)), nt, bt)
    ints[3 * bt:3 * bt + n] = seq_lens
    ints[3 * bt + n:3 * bt + bs] = q
    rows = host_block_tables[:bs * width].numpy().reshape(bs, width)
    rows[:] = 0
    fill_block_tables(block_tables, rows)
    return width


class DecodeGraphRunner:
    """Captures the model's forward for decode (and, optionally, speculative verify) steps at
    padded batch sizes; replays it for qualifying steps.

    Build after the KV pool exists (the graphs bake in the cache pointers) and never reallocate
    the pool afterwards. CUDA only; the attention backend must take negative slots as "skip"
    and size its launches from AttentionMetadata's Python ints (the Triton backend does).
    """

    def __init__(self, model, kv_caches, attn_backend, *, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device,
                 batch_sizes: Optional[Sequence[int]] = None, verify_tokens: int = 0,
                 verify_max_num_seqs: int = 0, logits_max_rows: int = 0,
                 capture: bool = True) -> None:
        """verify_tokens = k + 1 > 1 also captures verify steps (k drafts per sequence) at the
        sizes up to verify_max_num_seqs. logits_max_rows: graphs of at most that many tokens
        also compute the logits and their greedy argmax (graph_logits.py; 0: none).
        capture=False builds the buffers only (on any device): tests drive _stage and _body
        eagerly on CPU to check the padding logic without CUDA."""
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = sorted(set(batch_sizes)) if batch_sizes else capture_batch_sizes(max_num_seqs)
        self.verify_tokens = verify_tokens if verify_tokens > 1 else 0
        limit = min(verify_max_num_seqs, self.sizes[-1]) if self.verify_tokens else 0
        self.verify_sizes = [b for b in self.sizes if b < limit] + ([limit] if limit else [])
        # Every (batch size, tokens per sequence) graph; largest token count first for capture.
        self.keys = sorted([(b, 1) for b in self.sizes]
                           + [(b, self.verify_tokens) for b in self.verify_sizes],
                           key=lambda key: (-key[0] * key[1], -key[1]))
        self.max_bs = self.sizes[-1]
        self.logits_max_rows = logits_max_rows
        self.max_blocks = -(-max_model_len // block_size)
        self.num_replays = 0
        self.replays_by_size: collections.Counter[int] = collections.Counter()         # q == 1
        self.verify_replays_by_size: collections.Counter[int] = collections.Counter()  # q > 1

        mb, nb = self.max_bs, self.max_blocks
        n_ints = max(_ints_len(b, q) for b, q in self.keys)
        i32, i64 = torch.int32, torch.int64
        self._ints = torch.zeros(n_ints, dtype=i64, device=device)
        self._bt_stage = torch.zeros(mb * nb, dtype=i32, device=device)
        self._seq_lens = torch.ones(mb, dtype=i32, device=device)
        self._query_start_loc = {q: torch.arange(mb + 1, dtype=i32, device=device) * q
                                 for q in {q for _, q in self.keys}}
        self._block_tables = torch.zeros(mb, nb, dtype=i32, device=device)
        on_cuda = device.type == "cuda"
        self._host_ints = torch.zeros(n_ints, dtype=i64, pin_memory=on_cuda)
        self._host_bt = torch.zeros(mb * nb, dtype=i32, pin_memory=on_cuda)
        # The pinned staging is rewritten only once the previous step's copies have read it.
        self._fence = StagingFence(on_cuda)
        # What block_tables[:bs, :width] holds, so unchanged tables are not copied again.
        self._staged_tables = StagedTables()
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # (bs*q, hidden), graph-owned
        # (logits (bs*q, vocab) float32, greedy ids (bs*q,)), graph-owned, for the graphs
        # with the LM head inside (graph_logits.py).
        self._tails: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if capture:
            self.capture()

    # ------------------------------------------------------------------ capture

    def _forward(self, bs: int, q: int = 1) -> torch.Tensor:
        """The captured body: the model over the first bs sequences (bs * q tokens) of the
        persistent buffers."""
        ints, n = self._ints, bs * q
        self._seq_lens[:bs].copy_(ints[3 * n:3 * n + bs])  # int64 -> int32, part of the graph
        meta = AttentionMetadata(
            slot_mapping=ints[2 * n:3 * n],
            query_start_loc=self._query_start_loc[q][:bs + 1],
            seq_lens=self._seq_lens[:bs],
            block_tables=self._block_tables[:bs],
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[i * q for i in range(bs + 1)],
            seq_lens_cpu=None,  # unknown at capture; the Triton backend does not read it
        )
        return self.model(ints[:n], ints[n:2 * n], self.kv_caches, meta, self.attn_backend)

    def has_logits(self, bs: int, q: int = 1) -> bool:
        """Whether the (bs, q) graph computes the logits and their argmax too."""
        return bs * q <= self.logits_max_rows

    def _body(self, bs: int, q: int = 1) -> tuple[torch.Tensor, ...]:
        """What a graph captures: (hidden,) or, for a graph with the logits, (hidden, logits,
        greedy ids), all bs * q rows."""
        hidden = self._forward(bs, q)
        if not self.has_logits(bs, q):
            return (hidden,)
        return (hidden, *logits_tail(self.model, hidden))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (size, q), most tokens first, into one shared memory pool (the smaller
        graphs reuse the largest one's activation memory)."""
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for bs, q in self.keys:
                # All-padding inputs: the warm-up forward writes no K/V (slot -1 everywhere).
                self._stage([], [], [], [], [], bs, q)
                graph, out, eager = capture_after_warm_up(lambda: self._body(bs, q), pool)
                self._graphs[(bs, q)] = graph
                self._outputs[(bs, q)] = out[0]
                if len(out) > 1:
                    self._tails[(bs, q)] = out[1:]
                self._check_replay(bs, q, eager)
            torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d, verify %s) in %.1f s",
                    len(self.keys), self.sizes[0], self.max_bs,
                    f"{self.verify_tokens} tokens x {self.verify_sizes}" if self.verify_sizes
                    else "none", time.perf_counter() - start)

    def _check_replay(self, bs: int, q: int, eager: tuple[torch.Tensor, ...]) -> None:
        """Replay the new graph once on the same all-padding inputs and compare with the eager
        forward: a kernel that does not survive capture (host-side state, a pointer to a
        temporary) shows up here at start-up, and the caller falls back to eager decoding,
        rather than as wrong tokens later. The tolerance admits another kernel choice inside
        the graph, not garbage."""
        self._graphs[(bs, q)].replay()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        what = f"CUDA graph replay (batch {bs}, {q} token(s) per sequence)"
        check_replay_close(self._outputs[(bs, q)], eager[0], what)
        if (bs, q) in self._tails:
            logits, greedy_ids = self._tails[(bs, q)]
            check_replay_close(logits, eager[1], f"{what}, its logits")
            check_tail(logits, greedy_ids, what)

    # ------------------------------------------------------------------ replay

    def _stage(self, input_ids, positions, slot_mapping, seq_lens, block_tables,
               bs: int, q: int = 1) -> None:
        """Fill the pinned staging for a batch padded to bs sequences of q tokens and enqueue
        the device copies."""
        self._fence.wait()
        width = fill_decode_inputs(self._host_ints, self._host_bt, input_ids, positions,
                                   slot_mapping, seq_lens, block_tables, bs, q)
        n_ints = _ints_len(bs, q)
        self._ints[:n_ints].copy_(self._host_ints[:n_ints], non_blocking=True)
        if self._staged_tables.changed(self._host_bt[:bs * width].numpy(), bs):
            self._bt_stage[:bs * width].copy_(self._host_bt[:bs * width], non_blocking=True)
            self._block_tables[:bs, :width].copy_(self._bt_stage[:bs * width].view(bs, width))
        self._fence.copied()

    @property
    def block_table_uploads(self) -> int:
        """Steps whose block tables were copied to the device (the others reused them)."""
        return self._staged_tables.uploads

    def graph_key_for(self, step) -> Optional[tuple[int, int]]:
        """(padded batch size, tokens per sequence) of the graph a step (StepInputs) would
        replay, or None to run it eagerly."""
        shape = uniform_span_len(step)
        if shape is None:
            return None
        n, q = shape
        if q == 1:
            bs = padded_batch_size(n, self.sizes)
        elif q == self.verify_tokens:
            bs = padded_batch_size(n, self.verify_sizes)
        else:
            return None
        if bs is None or max(len(t) for t in step.block_tables) > self.max_blocks:
            return None  # a table wider than max_model_len allows (lookahead): stay eager
        return bs, q

    def padded_size_for(self, step) -> Optional[int]:
        """The captured batch size a step would replay at, or None to run it eagerly."""
        key = self.graph_key_for(step)
        return key[0] if key is not None else None

    def run(self, step, deferred=None) -> Optional[torch.Tensor]:
        """replay()'s hidden states only (or None: run the step eagerly)."""
        out = self.replay(step, deferred)
        return None if out is None else out.hidden

    def replay(self, step, deferred=None) -> Optional[GraphStep]:
        """Replay for a qualifying step: its real rows' outputs (GraphStep: the hidden states,
        and the logits and greedy ids where the graph computes them), views into graph-owned
        memory valid until the next replay of any of these graphs. None: run it eagerly. deferred: a DeferredTokens
        (deferred_tokens.py), written over the staged input ids before the replay (async
        scheduling: tokens the host has not seen yet)."""
        key = self.graph_key_for(step)
        if key is None:
            return None
        bs, q = key
        self._stage(step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                    step.block_tables, bs, q)
        if deferred is not None:
            deferred.write_into(self._ints)   # input ids are the first n int64 fields
        self._graphs[key].replay()
        self.num_replays += 1
        (self.replays_by_size if q == 1 else self.verify_replays_by_size)[bs] += 1
        n = len(step.input_ids)
        tail = self._tails.get(key)
        if tail is None:
            return GraphStep(self._outputs[key][:n], None, None)
        return GraphStep(self._outputs[key][:n], tail[0][:n], tail[1][:n])
